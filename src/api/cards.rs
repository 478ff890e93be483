//! The cards in the readers: `GET /v1/cards` (with `$filter`), one card, its last
//! reconciliation, and `POST …/sync` to read it again.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::{error, parse_filter, station, Listener, Refusals, Station};
use crate::card::Card;
use crate::reconcile::Reconciliation;

/// `$filter` over the cards' scalar fields and their reconciliation's verdict and state.
pub(crate) const CARD_FILTER_FIELDS: &[&str] = &[
    "kind",
    "reader",
    "card_id",
    "card_guid",
    "serial_number",
    "atr",
    "read_at",
    "read_ms",
    "apdu_count",
    "reconciliation/verdict",
    "reconciliation/state",
];

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct CardsQuery {
    /// An OData filter, e.g. `kind eq 'piv' and reconciliation/verdict eq 'critical'`.
    #[serde(rename = "$filter")]
    #[param(rename = "$filter", max_length = 2048)]
    filter: Option<String>,
}

#[utoipa::path(get, path = "/v1/cards", params(CardsQuery), responses(Refusals, (status = 200, description = "Every Card object in a reader (those matching $filter)"), (status = 400, description = "A malformed $filter (bad_filter, with the position)")))]
pub(super) async fn cards(
    State(l): State<Listener>,
    query: Result<Query<CardsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let text = match query {
        Ok(Query(q)) => q.filter,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_filter", &e.body_text()),
    };
    let Some(text) = text else {
        let body = l
            .shared
            .station
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cards_json();
        return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    };
    let filter = match parse_filter(Some(&text), CARD_FILTER_FIELDS) {
        Ok(filter) => filter,
        Err(refusal) => return refusal.into_response(),
    };
    let cards: Vec<Card> = station(&l, |s| s.readers().filter_map(|(_, c)| c.clone()).collect());
    // The reconciliations of these cards alone, taken under the lock the engine writes under.
    let reconciliations: HashMap<&str, Reconciliation> = {
        let recent = l
            .shared
            .reconciliations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        cards
            .iter()
            .filter_map(|card| card.card_id.as_deref())
            .filter_map(|id| Some((id, recent.get(id)?.clone())))
            .collect()
    };
    let matching: Vec<&Card> = cards
        .iter()
        .filter(|card| {
            let mut item = serde_json::to_value(card).unwrap_or_default();
            let r = card
                .card_id
                .as_deref()
                .and_then(|id| reconciliations.get(id));
            item["reconciliation"] = serde_json::to_value(r).unwrap_or_default();
            filter.matches(&item)
        })
        .collect();
    Json(matching).into_response()
}

pub(super) fn find_card(s: &Station, card_id: &str) -> Option<Card> {
    s.find_card(card_id)
}

#[utoipa::path(get, path = "/v1/cards/{card_id}", params(("card_id" = String, Path, description = "Hex card id")), responses(Refusals, (status = 200, description = "The Card"), (status = 404, description = "No such card in a reader")))]
pub(super) async fn card(State(l): State<Listener>, Path(card_id): Path<String>) -> Response {
    match station(&l, |s| find_card(s, &card_id)) {
        Some(card) => Json(card).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "card_not_present",
            "no card with this id is in a reader",
        ),
    }
}

#[utoipa::path(get, path = "/v1/cards/{card_id}/reconciliation", params(("card_id" = String, Path, description = "Hex card id")), responses(Refusals, (status = 200, description = "The card's last Reconciliation"), (status = 404, description = "Not reconciled")))]
pub(super) async fn reconciliation(
    State(l): State<Listener>,
    Path(card_id): Path<String>,
) -> Response {
    let card_id = card_id.to_ascii_uppercase();
    let cached = l
        .shared
        .reconciliations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&card_id)
        .cloned();
    // The engine keeps the recent ones in memory; older ones are in the store.
    let found = cached.or_else(|| {
        crate::store::blocking(|| {
            let guard = l.shared.store.lock().unwrap_or_else(|p| p.into_inner());
            guard.as_ref()?.last_reconciliation(&card_id).ok().flatten()
        })
    });
    match found {
        Some(r) => Json(r).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "not_reconciled",
            "this card has not been reconciled",
        ),
    }
}

/// `POST /v1/cards/{card_id}/sync`: read the card again (which reconciles it again). The body,
/// if any, must be a JSON object; the answer comes at once, the results as events.
#[utoipa::path(post, path = "/v1/cards/{card_id}/sync", params(("card_id" = String, Path, description = "Hex card id")), request_body(content = Object, content_type = "application/json", description = "An empty JSON object, or no body"), responses(Refusals, (status = 202, description = "The card is being read again"), (status = 400, description = "The body is not a JSON object"), (status = 404, description = "No such card in a reader"), (status = 413, description = "The body is over 64 KiB"), (status = 415, description = "Not application/json"), (status = 503, description = "cardbridge is stopping")))]
pub(super) async fn sync(
    State(l): State<Listener>,
    Path(card_id): Path<String>,
    body: Bytes,
) -> Response {
    if !body.is_empty()
        && !serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| v.is_object())
    {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "the body must be a JSON object",
        );
    }
    let Some(reader) = station(&l, |s| find_card(s, &card_id)).map(|c| c.reader) else {
        return error(
            StatusCode::NOT_FOUND,
            "card_not_present",
            "no card with this id is in a reader",
        );
    };
    let requested = l
        .shared
        .reads
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .is_some_and(|r| r.read(&reader));
    if !requested {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "cardbridge is stopping",
        );
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({"card_id": card_id, "reader": reader, "status": "reading"})),
    )
        .into_response()
}
