//! The local API: REST and Server-Sent Events over loopback TCP (and the Unix socket), for kiosk
//! and helpdesk applications. Every route goes through [`gate`] first, whose rules are in
//! [`security`]. One module per resource; [`routes`] is their table of contents.

pub mod cards;
pub mod console;
pub mod events;
pub mod filter;
mod gate;
mod health;
pub mod metrics;
mod readers;
pub(crate) mod revocations;
pub mod security;
pub mod serve;
pub mod tls;

pub use gate::{RefusalLog, UnixPeer};
pub use revocations::RevocationBudget;

pub use revocations::publish as publish_revocation;

/// Logs a station event and publishes it on the bus: the one place where events are
/// serialised.
pub fn announce(bus: &Bus, event: &crate::event::StationEvent) {
    event.log();
    bus.publish(event.name(), event.data());
}

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::card::Card;
use crate::engine::ReadRequester;
pub use crate::station::Station;
use crate::store::Store;
use events::Bus;
use security::Clients;

/// Shared by all listeners.
pub struct Shared {
    pub clients: Clients,
    pub bus: Bus,
    pub station: Arc<Mutex<Station>>,
    /// The engine's last reconciliation per card id (shared, not copied from the events).
    pub reconciliations: crate::engine::Cache,
    /// Set to true to stop: servers stop accepting and event streams end, so a graceful
    /// shutdown does not wait forever for clients that never disconnect.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Asks the engine for a fresh read; taken away (None) before the engine stops.
    pub reads: Mutex<Option<ReadRequester>>,
    /// The API's connection to the state database: the audit trail of state-changing calls
    /// and the revocation outbox (None in unit tests).
    pub store: Mutex<Option<Store>>,
    /// Wakes the revocation worker when a revocation was stored.
    pub outbox: Arc<tokio::sync::Notify>,
    /// Which servers revocations can go to.
    pub scepman_configured: bool,
    pub cm_configured: bool,
    pub failures: security::FailureBudget,
    /// Refused calls logged recently, so an attack leaves a trace without flooding the log.
    pub refusal_log: RefusalLog,
    pub metrics: crate::metrics::Metrics,
    /// Scopes of local processes on the Unix socket.
    pub local_users: Vec<crate::config::LocalUser>,
    /// Each client's budget of revocations (its name → bucket; as many entries as clients).
    pub revocation_budget: RevocationBudget,
    pub route_limits: RouteLimits,
}

impl Shared {
    /// Resolves once a stop was requested.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// The card with this id as a reader has it now, if it is in one.
    pub fn station_card(&self, card_id: &str) -> Option<Card> {
        self.station
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .find_card(card_id)
            .filter(|c| c.error.is_none())
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

/// One listener's view: the shared state and how its callers are identified.
#[derive(Clone)]
struct Listener {
    shared: Arc<Shared>,
    kind: Kind,
}

/// Largest request body accepted (state-changing routes take small JSON objects).
const BODY_LIMIT: usize = 64 * 1024;
/// The console's session request (`{"code"}` or `{"token"}`) is small, and comes from a person's
/// browser on this station: it needs neither a large body nor long, nor many at once.
const PUBLIC_BODY_LIMIT: usize = 1024;
const PUBLIC_TIMEOUT: Duration = Duration::from_secs(2);
const PUBLIC_CONCURRENCY: usize = 16;
/// How long a refused-for-load caller is told to wait before trying again.
const OVERLOAD_RETRY_AFTER: &str = "1";

/// The request limits of the short routes (every route but the event stream, which is
/// long-lived by design and capped per client instead): `[api] request_timeout_ms` and
/// `max_concurrent_requests`.
#[derive(Debug, Clone, Copy)]
pub struct RouteLimits {
    pub timeout: Duration,
    pub concurrency: usize,
}

impl RouteLimits {
    pub fn of(config: &crate::config::ApiConfig) -> RouteLimits {
        RouteLimits {
            timeout: config.request_timeout(),
            concurrency: config.max_concurrent_requests,
        }
    }
}

/// The routes for one listener.
pub fn router(shared: Arc<Shared>, kind: Kind) -> Router {
    let limits = shared.route_limits;
    let state = Listener { shared, kind };
    let (short, long, public, api) = routes();
    let document = Arc::new(api);
    let short = short
        .route(
            "/openapi.json",
            get(move || async move { Json(document.as_ref().clone()) }),
        )
        .fallback(not_found)
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.timeout,
        ))
        // Over the limit, a request is answered 503 at once rather than queued behind the
        // others: a kiosk retries after Retry-After instead of hanging. The limit is global:
        // axum gives every route its own copy of a layer, and this one shares its semaphore.
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    limits.concurrency,
                )),
        );
    // The console's session is asked for before anyone is known, so its callers get slots,
    // a deadline and a body size of their own: slow or many, they cannot hold a slot a token
    // holder needs.
    let public = public
        .layer(RequestBodyLimitLayer::new(PUBLIC_BODY_LIMIT))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            PUBLIC_TIMEOUT,
        ))
        .layer(
            tower::ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(overloaded))
                .load_shed()
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
                    PUBLIC_CONCURRENCY,
                )),
        );
    // Layers wrap what comes before them: the gate runs first, then the body limit (so an
    // oversized call is refused after the caller is known, and audited).
    short
        .merge(long)
        .merge(public)
        .layer(RequestBodyLimitLayer::new(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            gate::gate,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .with_state(state)
}

/// The answer to a request the concurrency limit turned away.
async fn overloaded(_: tower::BoxError) -> Response {
    let mut answer = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "too many requests are being handled; try again shortly",
    );
    answer.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(OVERLOAD_RETRY_AFTER),
    );
    answer
}

/// Every error is `{"error":{"code","message"}}`, also those that layers and extractors make
/// (413 from the body limit, 408 from the timeout, 405 from the router, 400 from a path that is
/// not UTF-8), so a client parses one shape.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_string();
    let code = match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        _ => "error",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    let mut json = error(status, code, &message);
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            json.headers_mut().append(name.clone(), value.clone());
        }
    }
    json
}

/// The OpenAPI document of the local API, as served at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes().3
}

/// The routes, from the annotated handlers, so the OpenAPI document lists exactly them, in three
/// groups by the limits they get: short (authenticated, the shared request slots), long (the
/// event stream) and public (the console's session, which reads a body before anyone is known),
/// and the OpenAPI document of all of them.
fn routes() -> (
    Router<Listener>,
    Router<Listener>,
    Router<Listener>,
    utoipa::openapi::OpenApi,
) {
    let (short, mut api) = OpenApiRouter::new()
        .routes(routes!(health::health))
        .routes(routes!(readers::readers))
        .routes(routes!(cards::cards))
        .routes(routes!(cards::card))
        .routes(routes!(cards::reconciliation))
        .routes(routes!(cards::sync))
        .routes(routes!(events::event_ticket))
        .routes(routes!(revocations::submit, revocations::list))
        .routes(routes!(revocations::one))
        .routes(routes!(metrics::metrics_text))
        .routes(routes!(console::sign_in))
        .split_for_parts();
    let (long, events_api) = OpenApiRouter::new()
        .routes(routes!(events::events))
        .split_for_parts();
    let (public, session_api) = OpenApiRouter::new()
        .routes(routes!(console::session))
        .split_for_parts();
    api.merge(events_api);
    api.merge(session_api);
    api.info.title = "cardbridge local API".into();
    (short, long, public, api)
}

/// The answers any route may give before or instead of its handler, declared once for the
/// OpenAPI document. A route that describes one of these statuses itself (its own 400 or 429)
/// lists it after `Refusals`, and its description replaces this one.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // only the derive reads it
enum Refusals {
    #[response(
        status = 400,
        description = "Malformed request: more than one Host header, or a path that is not UTF-8"
    )]
    BadRequest,
    #[response(status = 401, description = "Missing or unknown token")]
    Unauthorized,
    #[response(status = 403, description = "Origin, scope or local user refused")]
    Forbidden,
    #[response(status = 405, description = "The route does not take this method")]
    MethodNotAllowed,
    #[response(
        status = 408,
        description = "The request (its body included) took longer than [api] request_timeout_ms (10 s by default)"
    )]
    Timeout,
    #[response(status = 414, description = "The request target is longer than 8 KiB")]
    UriTooLong,
    #[response(status = 421, description = "Host does not name the listener")]
    Misdirected,
    #[response(
        status = 429,
        description = "Too many failed authentications (Retry-After says when to retry)"
    )]
    TooMany,
    #[response(
        status = 503,
        description = "More requests at once than [api] max_concurrent_requests (Retry-After says when to retry)"
    )]
    Overloaded,
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    ApiError::new(status, code, message).into_response()
}

/// An API error answer: `{"error":{"code","message"}}` with its status (and `Retry-After` when
/// the caller should wait), so handlers are steps joined by `?`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            retry_after: None,
        }
    }

    fn no_store() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_store",
            "the state database is not available",
        )
    }

    fn too_many_revocations(wait: Duration) -> ApiError {
        ApiError {
            retry_after: Some(wait),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_revocations",
                "this client has submitted too many revocations; retry later",
            )
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            e.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            // Whole seconds, rounded up, at least one.
            let seconds = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        response
    }
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such route")
}

fn station<T>(l: &Listener, f: impl FnOnce(&Station) -> T) -> T {
    f(&l.shared.station.lock().unwrap_or_else(|p| p.into_inner()))
}

/// A `$filter` parameter, or 400 `bad_filter` naming the problem and its position.
fn parse_filter(text: Option<&str>, fields: &[&str]) -> Result<filter::Filter, ApiError> {
    match text {
        None => Ok(filter::Filter::default()),
        Some(text) => filter::Filter::parse(text, fields)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_filter", e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Scope;
    use axum::body::Body;
    use sha2::Digest;
    use tower::ServiceExt;

    /// The refusals every route shares are in each operation, without hiding a route's own.
    #[test]
    fn every_operation_documents_the_common_refusals_and_keeps_its_own() {
        let api = openapi();
        for (path, item) in &api.paths.paths {
            let operations = [&item.get, &item.post].into_iter().flatten();
            for operation in operations {
                let codes: Vec<&str> = operation
                    .responses
                    .responses
                    .keys()
                    .map(String::as_str)
                    .collect();
                for common in [
                    "400", "401", "403", "405", "408", "414", "421", "429", "503",
                ] {
                    assert!(
                        codes.contains(&common),
                        "{path}: {common} missing from {codes:?}"
                    );
                }
            }
        }
        let post = api.paths.paths["/v1/revocations"].post.as_ref().unwrap();
        let described = |code: &str| match &post.responses.responses[code] {
            utoipa::openapi::RefOr::T(r) => r.description.clone(),
            utoipa::openapi::RefOr::Ref(_) => String::new(),
        };
        assert!(
            described("429").contains("too many revocations"),
            "the route's own 429 wins"
        );
        assert!(
            described("400").contains("Idempotency-Key"),
            "the route's own 400 wins"
        );
    }

    /// Every operation of the OpenAPI document is a route that exists (answers something other
    /// than the fallback's `not_found`), and the document has the routes the README promises.
    #[test]
    fn the_openapi_document_matches_the_routes() {
        let api = openapi();
        let mut paths: Vec<&str> = api.paths.paths.keys().map(String::as_str).collect();
        paths.sort_unstable();
        assert_eq!(
            paths,
            [
                "/metrics",
                "/v1/cards",
                "/v1/cards/{card_id}",
                "/v1/cards/{card_id}/reconciliation",
                "/v1/cards/{card_id}/sync",
                "/v1/console/session",
                "/v1/console/sign-in",
                "/v1/events",
                "/v1/events/ticket",
                "/v1/health",
                "/v1/readers",
                "/v1/revocations",
                "/v1/revocations/{id}",
            ]
        );
        let token = "t";
        let shared = Arc::new(Shared {
            clients: Clients::new(&[crate::config::ApiClient {
                name: "test".into(),
                token_sha256: hex::encode(sha2::Sha256::digest(token)),
                scopes: vec![Scope::Read, Scope::Sync],
                origins: Vec::new(),
            }]),
            bus: Bus::starting_at(1),
            station: Default::default(),
            reconciliations: Default::default(),
            stopping: tokio::sync::watch::channel(true).0,
            reads: Mutex::new(None),
            store: Mutex::new(None),
            outbox: Default::default(),
            scepman_configured: false,
            cm_configured: false,
            failures: Default::default(),
            refusal_log: Default::default(),
            metrics: Default::default(),
            local_users: Vec::new(),
            revocation_budget: RevocationBudget::new(20, 30),
            route_limits: RouteLimits::of(&crate::config::ApiConfig::default()),
        });
        let addr: SocketAddr = ([127, 0, 0, 1], 8687).into();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let operations = api.paths.paths.iter().flat_map(|(path, item)| {
            let get = item.get.as_ref().map(|_| (path, "GET"));
            let post = item.post.as_ref().map(|_| (path, "POST"));
            get.into_iter().chain(post)
        });
        let mut tried = 0;
        for (path, method) in operations {
            tried += 1;
            let request = axum::http::Request::builder()
                .method(method)
                .uri(path.replace("{card_id}", "00").replace("{id}", "1"))
                .header("host", "127.0.0.1:8687")
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .body(Body::empty())
                .unwrap();
            let response = runtime
                .block_on(router(shared.clone(), Kind::Tcp(addr)).oneshot(request))
                .unwrap();
            let status = response.status();
            let body = runtime
                .block_on(axum::body::to_bytes(response.into_body(), 1 << 20))
                .unwrap();
            assert!(
                !String::from_utf8_lossy(&body).contains("no such route")
                    && status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}: {status}"
            );
        }
        // Both methods of /v1/revocations included.
        assert_eq!(tried, 14);
    }
}
