//! `GET /v1/readers`: every reader pcscd reports, and the card id of the card in it.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::{station, Listener, Refusals};

#[derive(Serialize)]
pub(super) struct ReaderView {
    name: String,
    card_present: bool,
    card_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/readers", responses(Refusals, (status = 200, description = "Readers and whether each holds a card")))]
pub(super) async fn readers(State(l): State<Listener>) -> Response {
    let list: Vec<ReaderView> = station(&l, |s| {
        s.readers()
            .map(|(name, card)| ReaderView {
                name: name.clone(),
                card_present: card.is_some(),
                card_id: card.as_ref().and_then(|c| c.card_id.clone()),
            })
            .collect()
    });
    Json(list).into_response()
}
