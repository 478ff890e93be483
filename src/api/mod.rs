//! The local API: REST and Server-Sent Events over loopback TCP, for kiosk and helpdesk
//! applications. Every route goes through [`security`] first.

pub mod events;
pub mod metrics;
pub mod security;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};

use tower::limit::ConcurrencyLimitLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::card::Card;
use crate::config::Scope;
use crate::engine::ReadRequester;
use crate::reconcile::Reconciliation;
use crate::store::Store;
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
    /// Asks the engine for a fresh read; taken away (None) before the engine stops.
    pub reads: Mutex<Option<ReadRequester>>,
    /// Where state-changing calls are recorded.
    pub audit: Mutex<Option<Store>>,
    pub failures: security::FailureLimiter,
    pub metrics: metrics::Metrics,
    /// Scopes of local processes on the Unix socket.
    pub local_users: Vec<crate::config::LocalUser>,
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

/// How callers reach a listener, which decides how they are identified.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    /// Loopback TCP: bearer token, Host must name this address, Origin checked.
    Tcp(SocketAddr),
    /// The Unix socket: the peer's uid/gid (SO_PEERCRED) decides its scopes.
    Unix,
}

/// The credentials of a process on the Unix socket.
#[derive(Clone, Copy, Debug)]
pub struct UnixPeer {
    pub uid: u32,
    pub gid: u32,
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for UnixPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        // Without credentials (Linux always gives them) the peer gets uid/gid u32::MAX, which
        // no configuration names, so it has no scopes.
        match stream.io().peer_cred() {
            Ok(cred) => UnixPeer {
                uid: cred.uid(),
                gid: cred.gid(),
            },
            Err(_) => UnixPeer {
                uid: u32::MAX,
                gid: u32::MAX,
            },
        }
    }
}

/// One listener's view: the shared state and how its callers are identified.
#[derive(Clone)]
struct Listener {
    shared: Arc<Shared>,
    kind: Kind,
}

/// Largest request body accepted (state-changing routes take small JSON objects).
const BODY_LIMIT: usize = 64 * 1024;
/// Requests handled at once; more wait (the API serves one station's applications).
const CONCURRENCY: usize = 256;
/// A request (other than the event stream, which is long-lived by design) must finish in this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The routes for one listener.
pub fn router(shared: Arc<Shared>, kind: Kind) -> Router {
    let state = Listener { shared, kind };
    let short = Router::new()
        .route("/v1/health", get(health))
        .route("/v1/readers", get(readers))
        .route("/v1/cards", get(cards))
        .route("/v1/cards/{card_id}", get(card))
        .route("/v1/cards/{card_id}/reconciliation", get(reconciliation))
        .route("/v1/cards/{card_id}/sync", post(sync))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            REQUEST_TIMEOUT,
        ));
    // Layers wrap what comes before them: the gate runs first, then the body limit (so an
    // oversized call is refused after the caller is known, and audited).
    short
        .route("/v1/events", get(events))
        .layer(RequestBodyLimitLayer::new(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .layer(ConcurrencyLimitLayer::new(CONCURRENCY))
        .with_state(state)
}

/// The scope a request needs: reading for GETs, `sync` for the sync route.
fn scope_for(method: &Method) -> Scope {
    if method == Method::GET {
        Scope::Read
    } else {
        Scope::Sync
    }
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
    let method = request.method().clone();
    let (caller, scopes) = match identify(&l, &request) {
        Ok(caller) => caller,
        Err((status, code, message)) => return error(status, code, message),
    };
    let authorized = security::authorize(&scopes, scope_for(&method));
    let changes_state = method != Method::GET;
    let route = request.uri().path().to_string();
    let pattern = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let mut response = match authorized {
        Err(refusal) => error(refusal.status(), refusal.code(), refusal.message()),
        // State-changing calls take JSON only: a page cannot send that cross-origin without a
        // preflight, which only allowed origins pass.
        Ok(()) if changes_state && !is_json(&headers) => error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "state-changing requests must be Content-Type: application/json",
        ),
        Ok(()) => next.run(request).await,
    };
    l.shared
        .metrics
        .request(&pattern, response.status().as_u16());
    // Every state-changing attempt by a known client is recorded, refused ones included.
    if changes_state {
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        let status = response.status().as_u16();
        let guard = l.shared.audit.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Err(e)) = guard
            .as_ref()
            .map(|s| s.record_audit(&caller, origin, &route, status))
        {
            eprintln!("cardbridge: cannot write the audit trail: {e}");
        }
    }
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

/// A refusal: status, error code, message.
type Refused = (StatusCode, &'static str, &'static str);

/// Who is calling and with which scopes, or why not.
fn identify(l: &Listener, request: &Request) -> Result<(String, Vec<Scope>), Refused> {
    let headers = request.headers();
    match l.kind {
        Kind::Unix => {
            let peer = request
                .extensions()
                .get::<axum::extract::ConnectInfo<UnixPeer>>()
                .map(|c| c.0);
            let Some(UnixPeer { uid, gid }) = peer else {
                return Err((
                    StatusCode::FORBIDDEN,
                    "no_scopes",
                    "the caller's credentials are unknown",
                ));
            };
            let scopes = security::local_scopes(&l.shared.local_users, uid, gid);
            if scopes.is_empty() {
                return Err((
                    StatusCode::FORBIDDEN,
                    "no_scopes",
                    "this user has no scopes on the local API",
                ));
            }
            Ok((format!("uid {uid}"), scopes))
        }
        Kind::Tcp(addr) => {
            if !l.shared.failures.allows(headers) {
                return Err((
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_failures",
                    "too many failed authentications; wait and retry",
                ));
            }
            match security::identify(&l.shared.clients, headers, addr) {
                Ok(client) => Ok((client.name.clone(), client.scopes.clone())),
                Err(refusal) => {
                    if matches!(
                        refusal,
                        security::Refusal::MissingToken | security::Refusal::BadToken
                    ) {
                        l.shared.failures.failed(headers);
                    }
                    Err((refusal.status(), refusal.code(), refusal.message()))
                }
            }
        }
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such route")
}

fn station<T>(l: &Listener, f: impl FnOnce(&Station) -> T) -> T {
    f(&l.shared.station.lock().unwrap_or_else(|p| p.into_inner()))
}

async fn metrics_text(State(l): State<Listener>) -> Response {
    let (readers, cards) = station(&l, |s| {
        (s.readers.len(), s.readers.values().flatten().count())
    });
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        l.shared.metrics.render(readers, cards),
    )
        .into_response()
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

/// `POST /v1/cards/{card_id}/sync`: read the card again (which reconciles it again). The body,
/// if any, must be a JSON object; the answer comes at once, the results as events.
async fn sync(State(l): State<Listener>, Path(card_id): Path<String>, body: Bytes) -> Response {
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
