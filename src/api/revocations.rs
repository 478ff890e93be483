//! `POST /v1/revocations`, `GET /v1/revocations`, `GET /v1/revocations/{id}`: the local face of
//! the revocation outbox. A revocation is planned, then stored (committed) before the 202 goes
//! out; the worker delivers it and every change is a `revocation.updated` event.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::cards::find_card;
use super::security::Identity;
use super::Refusals;
use super::{error, security, station, ApiError, Listener};
use crate::cm::model::normalize_hex;
use crate::random::random_hex;
use crate::revoke::{plan, Known, KnownCertificate, Revocation, RevocationStatus, Submission};
use crate::store::revocations::{Column, Compare, Condition};
use crate::store::Store;

/// Longest accepted `Idempotency-Key`.
const MAX_KEY: usize = 200;

/// Tells listeners (SSE) and the log that a revocation changed.
pub fn publish(bus: &super::events::Bus, revocation: &Revocation) {
    let event = crate::event::StationEvent::RevocationUpdated(Box::new(revocation.clone()));
    super::announce(bus, &event);
}

/// `POST /v1/revocations`: validates and stores a revocation (or, with `dry_run`, only shows its
/// plan). The same `Idempotency-Key` from the same client with the same body returns the stored
/// revocation again; with another body it is refused (409).
#[utoipa::path(post, path = "/v1/revocations", params(("Idempotency-Key" = String, Header, description = "Unique per intended revocation (1 to 200 visible ASCII characters); a retry with the same key and body returns the same revocation", min_length = 1, max_length = 200, pattern = "^[!-~]+$")), request_body(content = inline(Submission), content_type = "application/json", description = "What to revoke, why, and by whom"), responses(Refusals, (status = 202, description = "The stored revocation: id, status, actions"), (status = 200, description = "dry_run: the plan, nothing stored"), (status = 400, description = "Missing Idempotency-Key, malformed body, bad reason or field"), (status = 404, description = "This station never read the card"), (status = 409, description = "The Idempotency-Key was used with another body"), (status = 413, description = "The body is over 64 KiB"), (status = 415, description = "Not application/json"), (status = 422, description = "Certificate not on the card, operation not allowed, server not configured, card unknown to MIM CM"), (status = 503, description = "The state database is not available"), (status = 429, description = "Too many failed authentications, or too many revocations from this client (Retry-After says when to try again)")))]
pub(super) async fn submit(
    State(l): State<Listener>,
    Extension(caller): Extension<Identity>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    crate::store::blocking(|| submit_steps(&l, &caller, &headers, &body))
        .unwrap_or_else(IntoResponse::into_response)
}

/// Reads a `POST /v1/revocations` body; anything but a revocation request is a `bad_body`.
pub(crate) fn parse_submission(body: &[u8]) -> Result<Submission, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("the body is not a revocation request: {e}"),
        )
    })
}

/// The steps of a submission, each refusing with its own [`ApiError`].
fn submit_steps(
    l: &Listener,
    caller: &Identity,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, ApiError> {
    let key = idempotency_key(headers)?;
    let submission = parse_submission(body)?;
    // Hashed as parsed (key order and spacing do not make another request).
    let request_hash = hex::encode(Sha256::digest(
        serde_json::to_vec(&submission).unwrap_or_default(),
    ));
    let card_id = normalize_hex(&submission.card_id);
    let guard = l.shared.store.lock().unwrap_or_else(|p| p.into_inner());
    let store = guard.as_ref().ok_or_else(ApiError::no_store)?;
    if !submission.dry_run {
        if let Some(stored) = replay(store, &caller.name, &key, &request_hash)? {
            return Ok(stored);
        }
    }
    let (certificates, reconciliation) = known_about(l, store, &card_id)?;
    let known = Known {
        card: certificates.as_deref(),
        reconciliation: reconciliation.as_ref(),
        scepman_configured: l.shared.scepman_configured,
        cm_configured: l.shared.cm_configured,
    };
    let plan = plan(&submission, &known).map_err(|e| {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
        ApiError::new(status, e.code(), e.to_string())
    })?;
    if submission.dry_run {
        return Ok(Json(json!({"dry_run": true, "plan": plan})).into_response());
    }
    // Counted against the account, so a console session shares its client's budget.
    l.shared
        .revocation_budget
        .take(&caller.account, Instant::now())
        .map_err(ApiError::too_many_revocations)?;
    let markers = plan
        .actions
        .iter()
        .map(|_| random_hex::<16>())
        .collect::<Result<Vec<String>, _>>()
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no_randomness",
                "the system's random source failed",
            )
        })?;
    let id = store.insert_revocation(&caller.name, &key, &request_hash, &plan, &markers)?;
    let revocation = store
        .revocation(id, false)?
        .ok_or_else(ApiError::no_store)?;
    drop(guard);
    publish(&l.shared.bus, &revocation);
    l.shared.outbox.notify_one();
    Ok((StatusCode::ACCEPTED, Json(revocation)).into_response())
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default();
    if key.is_empty() || key.len() > MAX_KEY || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
            "an Idempotency-Key header (1 to 200 visible ASCII characters) is required",
        ));
    }
    Ok(key.to_string())
}

/// The revocation stored before under this client's key: the same one again for the same
/// request, a 409 for another.
fn replay(
    store: &Store,
    client: &str,
    key: &str,
    request_hash: &str,
) -> Result<Option<Response>, ApiError> {
    match store.revocation_by_key(client, key)? {
        None => Ok(None),
        Some((_, hash)) if hash != request_hash => Err(ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request",
        )),
        Some((id, _)) => {
            let stored = store
                .revocation(id, false)?
                .ok_or_else(ApiError::no_store)?;
            Ok(Some((StatusCode::ACCEPTED, Json(stored)).into_response()))
        }
    }
}

/// What the station knows about a card: its certificates (from the reader now, else from its
/// last read) and its last reconciliation (the engine's, else the stored one).
fn known_about(
    l: &Listener,
    store: &Store,
    card_id: &str,
) -> Result<
    (
        Option<Vec<KnownCertificate>>,
        Option<crate::reconcile::Reconciliation>,
    ),
    ApiError,
> {
    let current = station(l, |s| find_card(s, card_id)).filter(|c| c.error.is_none());
    let certificates = match &current {
        Some(card) => Some(KnownCertificate::of(card)),
        None => store.card_certificates(card_id)?,
    };
    let cached = l
        .shared
        .reconciliations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(card_id)
        .cloned();
    let reconciliation = match cached {
        Some(r) => Some(r),
        None => store.last_reconciliation(card_id)?,
    };
    Ok((certificates, reconciliation))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// Only revocations with this status (a shorthand for `$filter=status eq '…'`).
    #[param(inline)]
    status: Option<RevocationStatus>,
    /// An OData filter over the revocation's scalar fields, e.g.
    /// `status eq 'failed' and created_at ge datetime'2026-11-01T00:00:00Z'`.
    #[serde(rename = "$filter")]
    #[param(rename = "$filter", max_length = 2048)]
    filter: Option<String>,
    /// Most revocations in one answer (1 to 500; 500 when absent).
    #[serde(rename = "$top")]
    #[param(rename = "$top", minimum = 1, maximum = 500)]
    top: Option<u16>,
    /// Continue below this revocation id: what the `Link: <…>; rel="next"` of the previous
    /// answer carries.
    #[serde(rename = "$skiptoken")]
    #[param(rename = "$skiptoken", minimum = 1)]
    skiptoken: Option<i64>,
}

/// Most revocations in one answer.
const MAX_TOP: u16 = 500;
/// Rows read from the database per step, and most rows one request examines: a filter that
/// matches little over a long trail is answered in pages (each with its `next` link) rather than
/// in one request of unbounded work.
const STEP: i64 = 200;
const MAX_EXAMINED: usize = 5000;

/// The fields `$filter` takes on revocations.
pub(crate) const FILTER_FIELDS: &[&str] = &[
    "id",
    "status",
    "card_id",
    "target",
    "reason",
    "reason_code",
    "operation",
    "revoker",
    "comment",
    "client",
    "created_at",
];

/// `GET /v1/revocations[?status=…][&$filter=…][&$top=…][&$skiptoken=…]`: revocations with
/// their actions, newest first, searched through the whole trail. When more may follow, the
/// answer's `Link` header names the next page (RFC 8288, `rel="next"`); the body stays a list.
#[utoipa::path(get, path = "/v1/revocations", params(ListQuery), responses(Refusals, (status = 200, description = "Revocations, newest first; a Link header with rel=\"next\" when more may follow"), (status = 400, description = "Unknown status, $top outside 1..500, a bad $skiptoken, or a malformed $filter (bad_filter, with the position)"), (status = 503, description = "The state database is not available")))]
pub(super) async fn list(
    State(l): State<Listener>,
    uri: axum::http::Uri,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(q)) if q.top.is_none_or(|t| (1..=MAX_TOP).contains(&t)) && q.skiptoken.is_none_or(|t| t > 0) => q,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_query",
                "the query parameters are status (queued, in_progress, succeeded, partially_failed or failed), $filter, $top (1 to 500) and $skiptoken (from a Link header)",
            )
        }
    };
    let filter = match super::parse_filter(query.filter.as_deref(), FILTER_FIELDS) {
        Ok(filter) => filter,
        Err(refusal) => return refusal.into_response(),
    };
    let top = usize::from(query.top.unwrap_or(MAX_TOP));
    with_store(&l, |store| {
        let page = search(store, &query, &filter, top)?;
        let mut answer = Json(page.items).into_response();
        if let Some(next) = page.next {
            let link = format!("<{}>; rel=\"next\"", next_page(&uri, next));
            if let Ok(value) = axum::http::HeaderValue::from_str(&link) {
                answer.headers_mut().insert(axum::http::header::LINK, value);
            }
        }
        Ok(answer)
    })
}

/// One answer of the list: its items, and where the next page starts when more may follow.
struct Page {
    items: Vec<serde_json::Value>,
    next: Option<i64>,
}

/// Walks the trail newest first from the query's skiptoken, the database narrowing by what it
/// can check ([`conditions`]), the filter and status deciding each row, until `top` items or
/// [`MAX_EXAMINED`] rows.
fn search(
    store: &Store,
    query: &ListQuery,
    filter: &super::filter::Filter,
    top: usize,
) -> Result<Page, crate::store::StoreError> {
    let conditions = conditions(filter);
    let mut items = Vec::new();
    let mut before = query.skiptoken;
    let mut examined = 0;
    loop {
        let rows = store.revocations_page(before, &conditions, STEP)?;
        let exhausted = rows.len() < STEP as usize;
        for r in rows {
            examined += 1;
            before = Some(r.id);
            let wanted = query.status.is_none_or(|s| s == r.status);
            let item = serde_json::to_value(&r).unwrap_or_default();
            if wanted && filter.matches(&item) {
                items.push(item);
                if items.len() == top {
                    return Ok(Page {
                        items,
                        next: before,
                    });
                }
            }
        }
        if exhausted {
            return Ok(Page { items, next: None });
        }
        if examined >= MAX_EXAMINED {
            return Ok(Page {
                items,
                next: before,
            });
        }
    }
}

/// The comparisons of `filter` the database can check with its indexes. Together they keep a
/// superset of the rows the filter keeps; the filter itself decides every row.
fn conditions(filter: &super::filter::Filter) -> Vec<Condition> {
    filter.terms.iter().filter_map(condition).collect()
}

fn condition(term: &super::filter::Comparison) -> Option<Condition> {
    use super::filter::{Literal, Op};
    use rusqlite::types::Value;
    let op = match term.op {
        Op::Eq => Compare::Eq,
        Op::Lt => Compare::Lt,
        Op::Le => Compare::Le,
        Op::Gt => Compare::Gt,
        Op::Ge => Compare::Ge,
        Op::Ne => return None,
    };
    let [field] = term.field.as_slice() else {
        return None;
    };
    let (column, op, value) = match (field.as_str(), &term.value) {
        ("id", Literal::Number(n)) => (Column::Id, op, Value::Real(*n)),
        ("reason_code", Literal::Number(n)) => (Column::ReasonCode, op, Value::Real(*n)),
        ("card_id", Literal::Text(t)) => (Column::CardId, op, Value::Text(t.clone())),
        ("reason", Literal::Text(t)) => (Column::Reason, op, Value::Text(t.clone())),
        ("revoker", Literal::Text(t)) => (Column::Revoker, op, Value::Text(t.clone())),
        ("comment", Literal::Text(t)) => (Column::Comment, op, Value::Text(t.clone())),
        ("client", Literal::Text(t)) => (Column::Client, op, Value::Text(t.clone())),
        // Compared to the second: a time after 10:00:00.5 is in the second 10:00:00 or later.
        ("created_at", Literal::DateTime(at)) => {
            let widened = match op {
                Compare::Gt => Compare::Ge,
                Compare::Lt => Compare::Le,
                other => other,
            };
            (
                Column::CreatedSecond,
                widened,
                Value::Text(utc_second(*at)?),
            )
        }
        _ => return None,
    };
    Some(Condition { column, op, value })
}

/// `YYYY-MM-DDTHH:MM:SS` of `at` in UTC, as the trail stores it.
fn utc_second(at: time::OffsetDateTime) -> Option<String> {
    let at = at.to_offset(time::UtcOffset::UTC);
    (0..=9999).contains(&at.year()).then(|| {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        )
    })
}

/// This request's target with `$skiptoken` set to `next`.
fn next_page(uri: &axum::http::Uri, next: i64) -> String {
    let kept = uri.query().unwrap_or_default().split('&').filter(|pair| {
        !pair.is_empty() && !pair.starts_with("$skiptoken=") && !pair.starts_with("%24skiptoken=")
    });
    let mut query: Vec<&str> = kept.collect();
    let token = format!("$skiptoken={next}");
    query.push(&token);
    format!("{}?{}", uri.path(), query.join("&"))
}

/// `GET /v1/revocations/{id}`: one revocation with its actions and every delivery attempt.
#[utoipa::path(get, path = "/v1/revocations/{id}", params(("id" = i64, Path, description = "Revocation id", minimum = 1)), responses(Refusals, (status = 200, description = "The revocation with its attempts"), (status = 400, description = "The id is not a number"), (status = 404, description = "No such revocation"), (status = 503, description = "The state database is not available")))]
pub(super) async fn one(
    State(l): State<Listener>,
    id: Result<Path<i64>, axum::extract::rejection::PathRejection>,
) -> Response {
    let Ok(Path(id)) = id else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_id",
            "a revocation id is a positive number",
        );
    };
    with_store(&l, |store| {
        Ok(match store.revocation(id, true)? {
            Some(r) => Json(r).into_response(),
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no revocation with this id",
            ),
        })
    })
}

fn with_store(
    l: &Listener,
    f: impl FnOnce(&Store) -> Result<Response, crate::store::StoreError>,
) -> Response {
    crate::store::blocking(|| {
        let guard = l.shared.store.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(store) => f(store).unwrap_or_else(|e| ApiError::from(e).into_response()),
            None => ApiError::no_store().into_response(),
        }
    })
}

/// Revocations per client: a burst, then a steady rate.
pub struct RevocationBudget {
    burst: f64,
    per_second: f64,
    buckets: Mutex<std::collections::HashMap<String, security::TokenBucket>>,
}

impl RevocationBudget {
    pub fn new(burst: u32, per_minute: u32) -> RevocationBudget {
        RevocationBudget {
            burst: f64::from(burst),
            per_second: f64::from(per_minute) / 60.0,
            buckets: Mutex::default(),
        }
    }

    /// Takes one revocation of `client`, or says when the next one is allowed.
    pub fn take(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .entry(client.to_string())
            .or_insert_with(|| security::TokenBucket::new(self.burst, self.per_second, now))
            .take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_are_budgeted_per_client() {
        let budget = RevocationBudget::new(2, 60);
        let now = Instant::now();
        assert!(budget.take("kiosk", now).is_ok());
        assert!(budget.take("kiosk", now).is_ok());
        let wait = budget.take("kiosk", now).unwrap_err();
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::ZERO,
            "{wait:?}"
        );
        assert!(
            budget.take("helpdesk", now).is_ok(),
            "another client has its own"
        );
        assert!(
            budget.take("kiosk", now + Duration::from_secs(1)).is_ok(),
            "one a second back"
        );
    }
}
