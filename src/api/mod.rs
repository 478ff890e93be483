//! The local API: REST and Server-Sent Events over loopback TCP, for kiosk and helpdesk
//! applications. Every route goes through [`security`] first.

pub mod events;
pub mod security;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

use crate::card::Card;
use crate::config::Scope;
use crate::reconcile::Reconciliation;
use events::{Backlog, Bus, Numbered};
use security::Clients;

/// What the station looks like now, kept up to date from the engine's events.
#[derive(Debug, Default)]
pub struct Station {
    /// Readers by name, with the card in each (a failed read keeps its error).
    pub readers: BTreeMap<String, Option<Card>>,
    pub reconciliations: BTreeMap<String, Reconciliation>,
}

/// Shared by all listeners.
pub struct Shared {
    pub clients: Clients,
    pub bus: Bus,
    pub station: Mutex<Station>,
    /// Set to true to stop: servers stop accepting and event streams end, so a graceful
    /// shutdown does not wait forever for clients that never disconnect.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    /// Resolves once a stop was requested.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

/// One listener's view: the shared state and the address its Host header must name.
#[derive(Clone)]
struct Listener {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

/// The routes for one listener.
pub fn router(shared: Arc<Shared>, addr: SocketAddr) -> Router {
    let state = Listener { shared, addr };
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/readers", get(readers))
        .route("/v1/cards", get(cards))
        .route("/v1/cards/{card_id}", get(card))
        .route("/v1/cards/{card_id}/reconciliation", get(reconciliation))
        .route("/v1/events", get(events))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Preflights for allowed origins, then the security check of every request, then CORS headers
/// (the exact origin, never `*`) on the answer.
async fn gate(State(l): State<Listener>, request: Request, next: Next) -> Response {
    let headers = request.headers().clone();
    if let Some(origin) = security::preflight_origin(&l.shared.clients, &headers, request.method())
    {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, last-event-id, idempotency-key"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        return response;
    }
    if request.method() == Method::OPTIONS {
        return error(
            StatusCode::FORBIDDEN,
            "foreign_origin",
            "this origin is not allowed",
        );
    }
    if let Err(refusal) = security::check(&l.shared.clients, &headers, l.addr, Scope::Read) {
        return error(refusal.status(), refusal.code(), refusal.message());
    }
    let mut response = next.run(request).await;
    if let Some(origin) = headers.get(header::ORIGIN) {
        response
            .headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        response
            .headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such route")
}

fn station<T>(l: &Listener, f: impl FnOnce(&Station) -> T) -> T {
    f(&l.shared.station.lock().unwrap_or_else(|p| p.into_inner()))
}

async fn health(State(l): State<Listener>) -> Response {
    let (readers, cards) = station(&l, |s| {
        (s.readers.len(), s.readers.values().flatten().count())
    });
    Json(json!({"status": "ok", "readers": readers, "cards": cards})).into_response()
}

#[derive(Serialize)]
struct ReaderView {
    name: String,
    card_present: bool,
    card_id: Option<String>,
}

async fn readers(State(l): State<Listener>) -> Response {
    let list: Vec<ReaderView> = station(&l, |s| {
        s.readers
            .iter()
            .map(|(name, card)| ReaderView {
                name: name.clone(),
                card_present: card.is_some(),
                card_id: card.as_ref().and_then(|c| c.card_id.clone()),
            })
            .collect()
    });
    Json(list).into_response()
}

async fn cards(State(l): State<Listener>) -> Response {
    let list: Vec<Card> = station(&l, |s| s.readers.values().flatten().cloned().collect());
    Json(list).into_response()
}

fn find_card(s: &Station, card_id: &str) -> Option<Card> {
    s.readers
        .values()
        .flatten()
        .find(|c| {
            c.card_id
                .as_deref()
                .is_some_and(|id| id.eq_ignore_ascii_case(card_id))
        })
        .cloned()
}

async fn card(State(l): State<Listener>, Path(card_id): Path<String>) -> Response {
    match station(&l, |s| find_card(s, &card_id)) {
        Some(card) => Json(card).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            "card_not_present",
            "no card with this id is in a reader",
        ),
    }
}

async fn reconciliation(State(l): State<Listener>, Path(card_id): Path<String>) -> Response {
    let found = station(&l, |s| {
        s.reconciliations
            .get(&card_id.to_ascii_uppercase())
            .cloned()
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

fn sse(event: &Numbered) -> SseEvent {
    SseEvent::default()
        .id(event.id.to_string())
        .event(event.name.clone())
        .data(event.data.clone())
}

async fn events(
    State(l): State<Listener>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let (backlog, live) = l.shared.bus.subscribe(last);
    let first: Vec<SseEvent> = match backlog {
        Backlog::Events(missed) => missed.iter().map(sse).collect(),
        Backlog::Resync => vec![SseEvent::default().event("resync").data("{}")],
    };
    // A lagging client gets an error from the channel: its stream ends there, it reconnects
    // with Last-Event-ID, and nobody else waited for it.
    let live = BroadcastStream::new(live)
        .take_while(Result::is_ok)
        .filter_map(|e| e.ok().map(|e| sse(&e)));
    let stream = tokio_stream::iter(first).chain(live).map(Ok);
    let stream = futures_util::StreamExt::take_until(stream, l.shared.stopped());
    Sse::new(stream).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keep-alive"),
    )
}
