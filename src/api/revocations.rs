//! `POST /v1/revocations`, `GET /v1/revocations`, `GET /v1/revocations/{id}`: the local face of
//! the revocation outbox. A revocation is planned, then stored (committed) before the 202 goes
//! out; the worker delivers it and every change is a `revocation.updated` event.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::security::Identity;
use super::Refusals;
use super::{error, find_card, station, ApiError, Listener};
use crate::cm::model::normalize_hex;
use crate::random::random_hex;
use crate::revoke::{plan, Known, KnownCertificate, Revocation, RevocationStatus, Submission};
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
}

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

/// `GET /v1/revocations[?status=…][&$filter=…]`: the newest 500 revocations with their actions.
#[utoipa::path(get, path = "/v1/revocations", params(ListQuery), responses(Refusals, (status = 200, description = "Revocations, newest first"), (status = 400, description = "Unknown status, or a malformed $filter (bad_filter, with the position)"), (status = 503, description = "The state database is not available")))]
pub(super) async fn list(
    State(l): State<Listener>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_status",
            "the query parameters are status (queued, in_progress, succeeded, partially_failed or failed) and $filter",
        );
    };
    let filter = match super::parse_filter(query.filter.as_deref(), FILTER_FIELDS) {
        Ok(filter) => filter,
        Err(refusal) => return refusal.into_response(),
    };
    with_store(&l, |store| {
        let revocations = store.revocations(query.status)?;
        let items: Vec<serde_json::Value> = revocations
            .iter()
            .filter_map(|r| serde_json::to_value(r).ok())
            .filter(|r| filter.matches(r))
            .collect();
        Ok(Json(items).into_response())
    })
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
