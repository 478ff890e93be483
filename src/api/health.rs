//! `GET /v1/health`: is the station up, and how many readers and cards it sees.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::{station, Listener, Refusals, Station};

#[utoipa::path(get, path = "/v1/health", responses(Refusals, (status = 200, description = "Station health: reader and card counts")))]
pub(super) async fn health(State(l): State<Listener>) -> Response {
    let (readers, cards) = station(&l, Station::counts);
    Json(json!({"status": "ok", "readers": readers, "cards": cards})).into_response()
}
