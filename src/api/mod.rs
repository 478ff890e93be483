//! The local API: REST and Server-Sent Events over loopback TCP, for kiosk and helpdesk
//! applications. Every route goes through [`security`] first.

pub mod console;
pub mod events;
pub mod filter;
pub mod metrics;
pub(crate) mod revocations;
pub mod security;
pub mod serve;
pub mod tls;

pub use revocations::publish as publish_revocation;

/// Logs a station event and publishes it on the bus: the one place where events are
/// serialised.
pub fn announce(bus: &Bus, event: &crate::event::StationEvent) {
    event.log();
    bus.publish(event.name(), event.data());
}

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::card::Card;
use crate::config::Scope;
use crate::engine::ReadRequester;
pub use crate::station::Station;
use crate::store::Store;
use events::{Backlog, Bus, Numbered};
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

/// The credentials of a process on the Unix socket: SO_PEERCRED's uid and gid, and the
/// user's supplementary groups from the group database (NSS, so directory groups count; the
/// process's own list is not readable under the unit's `ProtectProc=invisible`).
#[derive(Clone, Debug)]
pub struct UnixPeer {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl UnixPeer {
    /// No credentials (Linux always gives them): ids no configuration names, so no scopes.
    fn nobody() -> UnixPeer {
        UnixPeer {
            uid: u32::MAX,
            gid: u32::MAX,
            groups: Vec::new(),
        }
    }

    /// Looks the user's groups up. Blocking (NSS may ask a directory).
    fn of(uid: u32, gid: u32) -> UnixPeer {
        let groups = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .and_then(|user| {
                let name = std::ffi::CString::new(user.name).ok()?;
                nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).ok()
            })
            .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        UnixPeer { uid, gid, groups }
    }
}

impl serve::Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    type Peer = UnixPeer;

    async fn accept(&mut self) -> std::io::Result<(tokio::net::UnixStream, UnixPeer)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        let peer = match stream.peer_cred() {
            Ok(cred) => {
                let (uid, gid) = (cred.uid(), cred.gid());
                tokio::task::spawn_blocking(move || UnixPeer::of(uid, gid))
                    .await
                    .unwrap_or_else(|_| UnixPeer::nobody())
            }
            Err(_) => UnixPeer::nobody(),
        };
        Ok((stream, peer))
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
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
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

/// The routes, from the annotated handlers, so the OpenAPI document lists exactly them: the
/// short requests (under the request timeout) and the event stream, and the document.
/// The routes in three groups by the limits they get: short (authenticated, the shared request
/// slots), long (the event stream) and public (the console's session, which reads a body
/// before anyone is known), and the OpenAPI document of all of them.
fn routes() -> (
    Router<Listener>,
    Router<Listener>,
    Router<Listener>,
    utoipa::openapi::OpenApi,
) {
    let (short, mut api) = OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(readers))
        .routes(routes!(cards))
        .routes(routes!(card))
        .routes(routes!(reconciliation))
        .routes(routes!(sync))
        .routes(routes!(event_ticket))
        .routes(routes!(revocations::submit, revocations::list))
        .routes(routes!(revocations::one))
        .routes(routes!(metrics::metrics_text))
        .routes(routes!(console::sign_in))
        .split_for_parts();
    let (long, events_api) = OpenApiRouter::new()
        .routes(routes!(events))
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

/// The longest request target accepted; longer ones get 414 (hyper's own limit, 64 KiB, is
/// answered by hyper without a body).
const MAX_URI: usize = 8 * 1024;

/// The state-changing routes (POST) and the scope each needs; every other route (and every
/// other method, which then gets its 405 from the router) needs the `read` scope.
const STATE_CHANGING: [(&str, Scope); 3] = [
    ("/v1/cards/{card_id}/sync", Scope::Sync),
    ("/v1/revocations", Scope::Revoke),
    ("/v1/console/sign-in", Scope::Read),
];

/// The event stream, the one route that also takes a `ticket` instead of a token.
const EVENTS_ROUTE: &str = "/v1/events";

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

/// Preflights for allowed origins, then the security check of every request, then CORS headers
/// (the exact origin, never `*`) on the answer.
async fn gate(State(l): State<Listener>, request: Request, next: Next) -> Response {
    if request.uri().to_string().len() > MAX_URI {
        return error(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            "the request target is longer than 8 KiB",
        );
    }
    let headers = request.headers().clone();
    if let Kind::Tcp(addr) = l.kind {
        if console::is_public(request.method(), request.uri().path()) {
            return public(&l, request, next, addr).await;
        }
    }
    if let Some(origin) = security::preflight_origin(&l.shared.clients, &headers, request.method())
    {
        return preflight(origin, &headers);
    }
    if request.method() == Method::OPTIONS {
        return refused(
            &l,
            &headers,
            StatusCode::FORBIDDEN,
            "foreign_origin",
            "this origin is not allowed",
        );
    }
    let caller = match identify(&l, &request) {
        Ok(caller) => caller,
        Err((status, code, message)) => return refused(&l, &headers, status, code, message),
    };
    let pattern = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let changing = state_changing(request.method(), &pattern);
    let route = request.uri().path().to_string();
    let mut request = request;
    request.extensions_mut().insert(caller.clone());
    let mut response = match security::authorize(&caller.scopes, changing.unwrap_or(Scope::Read)) {
        Err(refusal) => error(refusal.status(), refusal.code(), refusal.message()),
        // State-changing calls take JSON only: a page cannot send that cross-origin without a
        // preflight, which only allowed origins pass.
        Ok(()) if changing.is_some() && !is_json(&headers) => error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "state-changing requests must be Content-Type: application/json",
        ),
        Ok(()) => next.run(request).await,
    };
    let status = response.status().as_u16();
    l.shared.metrics.request(&pattern, status);
    if changing.is_some() {
        audit(&l, &caller.name, &headers, &route, status);
    }
    if matches!(l.kind, Kind::Tcp(_)) {
        if let Some(origin) = headers.get(header::ORIGIN) {
            with_cors(&mut response, origin.clone());
        }
    }
    response
}

/// The console's page, its assets and its session route: no token, but the Host rule, and JSON
/// for the session route as for every POST.
async fn public(l: &Listener, request: Request, next: Next, listener: SocketAddr) -> Response {
    let headers = request.headers();
    let authority = request.uri().authority().map(|a| a.as_str().to_string());
    if let Err(refusal) = security::check_host(headers, authority.as_deref(), listener) {
        return refused(
            l,
            headers,
            refusal.status(),
            refusal.code(),
            refusal.message(),
        );
    }
    let path = request.uri().path().to_string();
    let response = match console::asset(&path) {
        Some(page) => page,
        None if !is_json(headers) => error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "state-changing requests must be Content-Type: application/json",
        ),
        None => next.run(request).await,
    };
    l.shared.metrics.request(&path, response.status().as_u16());
    response
}

/// The scope a state-changing route needs; `None` for the others (they need `read`).
fn state_changing(method: &Method, pattern: &str) -> Option<Scope> {
    STATE_CHANGING
        .iter()
        .find(|(route, _)| method == Method::POST && pattern == *route)
        .map(|(_, scope)| *scope)
}

/// Records a state-changing attempt by a known client, refused ones included.
fn audit(l: &Listener, caller: &str, headers: &HeaderMap, route: &str, status: u16) {
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    let guard = l.shared.store.lock().unwrap_or_else(|p| p.into_inner());
    let recorded = crate::store::blocking(|| {
        guard
            .as_ref()
            .map(|s| s.record_audit(caller, origin, route, status))
    });
    if let Some(Err(e)) = recorded {
        tracing::error!("cannot write the audit trail: {e}");
    }
}

/// The answer to a CORS preflight from an allowed origin.
fn preflight(origin: HeaderValue, headers: &HeaderMap) -> Response {
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
    // Chrome's Private Network Access: a page on a public or LAN address may call loopback
    // only when the preflight says so (allowed origins only, as above).
    if headers.contains_key("access-control-request-private-network") {
        h.insert(
            "access-control-allow-private-network",
            HeaderValue::from_static("true"),
        );
    }
    response
}

fn with_cors(response: &mut Response, origin: HeaderValue) {
    let h = response.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
}

/// A refusal before the caller is known: counted, logged at a bounded rate, and readable by a
/// page of an allowed origin (so it can tell an expired token from a Host problem). A refusal
/// for too many failures closes the connection and says when to come back.
fn refused(
    l: &Listener,
    headers: &HeaderMap,
    status: StatusCode,
    code: &'static str,
    message: &str,
) -> Response {
    l.shared.metrics.refused(code);
    l.shared.refusal_log.note(code, Instant::now());
    let mut response = error(status, code, message);
    if status == StatusCode::TOO_MANY_REQUESTS {
        let h = response.headers_mut();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if matches!(l.kind, Kind::Tcp(_)) {
        if let Some(origin) = security::allowed_origin(&l.shared.clients, headers) {
            with_cors(&mut response, origin);
        }
    }
    response
}

/// Logs refused calls at warn level, at most once per code every [`RefusalLog::EVERY`], with
/// how many were refused since; no header value is ever logged.
#[derive(Default)]
pub struct RefusalLog {
    last: Mutex<std::collections::HashMap<&'static str, (Option<Instant>, u64)>>,
}

impl RefusalLog {
    const EVERY: Duration = Duration::from_secs(10);

    pub fn note(&self, code: &'static str, now: Instant) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        // (Not `now - EVERY` for the first time: that underflows in the first seconds after
        // boot, when a udev-started daemon may well be refusing calls.)
        let (at, suppressed) = last.entry(code).or_insert((None, 0));
        if at.is_none_or(|at| now.saturating_duration_since(at) >= Self::EVERY) {
            tracing::warn!(
                refusal = code,
                "local API call refused ({code}; {} more since the last report)",
                *suppressed
            );
            *at = Some(now);
            *suppressed = 0;
        } else {
            *suppressed += 1;
        }
    }
}

/// A refusal: status, error code, message.
type Refused = (StatusCode, &'static str, &'static str);

/// Who is calling, or why not.
fn identify(l: &Listener, request: &Request) -> Result<security::Identity, Refused> {
    let headers = request.headers();
    match l.kind {
        Kind::Unix => {
            let peer = request
                .extensions()
                .get::<axum::extract::ConnectInfo<UnixPeer>>()
                .map(|c| &c.0);
            let Some(UnixPeer { uid, gid, groups }) = peer else {
                return Err((
                    StatusCode::FORBIDDEN,
                    "no_scopes",
                    "the caller's credentials are unknown",
                ));
            };
            let scopes = security::local_scopes(&l.shared.local_users, *uid, *gid, groups);
            if scopes.is_empty() {
                return Err((
                    StatusCode::FORBIDDEN,
                    "no_scopes",
                    "this user has no scopes on the local API",
                ));
            }
            Ok(security::Identity::local(*uid, scopes))
        }
        Kind::Tcp(addr) => {
            // A ticket stands in for the token only where a browser cannot send one.
            let ticket = (request.uri().path() == EVENTS_ROUTE)
                .then(|| query_value(request.uri().query(), "ticket"))
                .flatten();
            let parts = security::RequestParts {
                headers,
                authority: request.uri().authority().map(|a| a.as_str()),
                ticket,
            };
            security::identify(&l.shared.clients, &l.shared.failures, &parts, addr)
                .map_err(|refusal| (refusal.status(), refusal.code(), refusal.message()))
        }
    }
}

/// The value of `key` in a query string (tickets and event ids need no percent-decoding).
fn query_value<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
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

#[utoipa::path(get, path = "/v1/health", responses(Refusals, (status = 200, description = "Station health: reader and card counts")))]
async fn health(State(l): State<Listener>) -> Response {
    let (readers, cards) = station(&l, Station::counts);
    Json(json!({"status": "ok", "readers": readers, "cards": cards})).into_response()
}

#[derive(Serialize)]
struct ReaderView {
    name: String,
    card_present: bool,
    card_id: Option<String>,
}

#[utoipa::path(get, path = "/v1/readers", responses(Refusals, (status = 200, description = "Readers and whether each holds a card")))]
async fn readers(State(l): State<Listener>) -> Response {
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
struct CardsQuery {
    /// An OData filter, e.g. `kind eq 'piv' and reconciliation/verdict eq 'critical'`.
    #[serde(rename = "$filter")]
    #[param(rename = "$filter", max_length = 2048)]
    filter: Option<String>,
}

#[utoipa::path(get, path = "/v1/cards", params(CardsQuery), responses(Refusals, (status = 200, description = "Every Card object in a reader (those matching $filter)"), (status = 400, description = "A malformed $filter (bad_filter, with the position)")))]
async fn cards(
    State(l): State<Listener>,
    query: Result<Query<CardsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let text = match query {
        Ok(Query(q)) => q.filter,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_filter", &e.body_text()),
    };
    let Some(text) = text else {
        let body = station(&l, Station::cards_json);
        return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    };
    let filter = match parse_filter(Some(&text), CARD_FILTER_FIELDS) {
        Ok(filter) => filter,
        Err(refusal) => return refusal.into_response(),
    };
    let cards: Vec<Card> = station(&l, |s| s.readers().filter_map(|(_, c)| c.clone()).collect());
    let reconciliations = l
        .shared
        .reconciliations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let matching: Vec<&Card> = cards
        .iter()
        .filter(|card| {
            let mut item = serde_json::to_value(card).unwrap_or_default();
            let r = card.card_id.as_ref().and_then(|id| reconciliations.get(id));
            item["reconciliation"] = serde_json::to_value(r).unwrap_or_default();
            filter.matches(&item)
        })
        .collect();
    Json(matching).into_response()
}

/// A `$filter` parameter, or 400 `bad_filter` naming the problem and its position.
fn parse_filter(text: Option<&str>, fields: &[&str]) -> Result<filter::Filter, ApiError> {
    match text {
        None => Ok(filter::Filter::default()),
        Some(text) => filter::Filter::parse(text, fields)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_filter", e.to_string())),
    }
}

fn find_card(s: &Station, card_id: &str) -> Option<Card> {
    s.find_card(card_id)
}

#[utoipa::path(get, path = "/v1/cards/{card_id}", params(("card_id" = String, Path, description = "Hex card id")), responses(Refusals, (status = 200, description = "The Card"), (status = 404, description = "No such card in a reader")))]
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

#[utoipa::path(get, path = "/v1/cards/{card_id}/reconciliation", params(("card_id" = String, Path, description = "Hex card id")), responses(Refusals, (status = 200, description = "The card's last Reconciliation"), (status = 404, description = "Not reconciled")))]
async fn reconciliation(State(l): State<Listener>, Path(card_id): Path<String>) -> Response {
    let found = l
        .shared
        .reconciliations
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&card_id.to_ascii_uppercase())
        .cloned();
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

/// `POST /v1/events/ticket`: a one-time ticket for `GET /v1/events?ticket=…`, for browser
/// `EventSource`, which cannot send the Authorization header. The page asks with its token
/// (`fetch`, preflighted like any call), then opens the stream with the ticket within 30 s; the
/// stream is checked as if the token came with it (Host, Origin, scope).
#[utoipa::path(post, path = "/v1/events/ticket", responses(Refusals, (status = 201, description = "A ticket: {\"ticket\", \"expires_in_s\"}"), (status = 400, description = "The caller has no bearer token (the Unix socket needs no ticket)"), (status = 429, description = "Too many failed authentications or outstanding tickets")))]
async fn event_ticket(
    State(l): State<Listener>,
    Extension(caller): Extension<security::Identity>,
    headers: HeaderMap,
) -> Response {
    if security::bearer(&headers).is_none() {
        return error(
            StatusCode::BAD_REQUEST,
            "no_token",
            "tickets are issued to callers with a bearer token",
        );
    }
    match l.shared.clients.issue_ticket(&caller) {
        Ok(ticket) => (
            StatusCode::CREATED,
            Json(json!({
                "ticket": ticket,
                "expires_in_s": security::TICKET_LIFETIME.as_secs(),
            })),
        )
            .into_response(),
        Err(e) => {
            let (status, code) = match e {
                security::TicketError::TooMany => {
                    (StatusCode::TOO_MANY_REQUESTS, "too_many_tickets")
                }
                security::TicketError::NoRandomness => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "no_randomness")
                }
            };
            error(status, code, &e.to_string())
        }
    }
}

#[utoipa::path(get, path = "/v1/events", params(("Last-Event-ID" = Option<u64>, Header, description = "Resume after this event", maximum = 9223372036854775807_u64), ("last_event_id" = Option<u64>, Query, description = "Resume after this event, for a browser EventSource reopened with a new ticket (the header wins)", maximum = 9223372036854775807_u64), ("ticket" = Option<String>, Query, description = "A one-time ticket from POST /v1/events/ticket, instead of the Authorization header")), responses(Refusals, (status = 400, description = "Last-Event-ID is not an event id"), (status = 200, description = "Server-Sent Events", content_type = "text/event-stream"), (status = 401, description = "Missing or unknown token or ticket"), (status = 429, description = "Too many failed authentications, or too many event streams of this client")))]
async fn events(State(l): State<Listener>, parts: axum::http::request::Parts) -> Response {
    let (headers, uri) = (&parts.headers, &parts.uri);
    // The stream counts against its client's cap and keeps its connection from being closed as
    // idle (requests through the router alone, in unit tests, have no connection).
    let guard = match (
        parts.extensions.get::<serve::Connection>(),
        parts.extensions.get::<security::Identity>(),
    ) {
        (Some(connection), Some(caller)) => match connection.open_stream(&caller.account) {
            Some(guard) => Some(guard),
            None => {
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_streams",
                    "this client has too many event streams open",
                )
            }
        },
        _ => None,
    };
    let given = headers
        .get("last-event-id")
        .map(|v| v.to_str().ok())
        .or_else(|| query_value(uri.query(), "last_event_id").map(Some));
    let last = match given.map(|v| {
        v.and_then(|v| v.trim().parse::<i64>().ok())
            .and_then(|id| u64::try_from(id).ok())
    }) {
        None => None,
        Some(Some(id)) => Some(id),
        Some(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_last_event_id",
                "Last-Event-ID must be an event id (a number)",
            )
        }
    };
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
    let stream = tokio_stream::iter(first).chain(live).map(move |e| {
        let _held = &guard;
        Ok::<_, std::convert::Infallible>(e)
    });
    let stream = futures_util::StreamExt::take_until(stream, l.shared.stopped());
    Sse::new(stream)
        .keep_alive(
            KeepAlive::new()
                .interval(Duration::from_secs(15))
                .text("keep-alive"),
        )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use sha2::Digest;
    use tower::ServiceExt;

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

    /// A POST route missing from `STATE_CHANGING` would need only `read`, skip the JSON-only
    /// rule and go unaudited. Two deliberate exceptions: the ticket route (it changes nothing
    /// but the caller's own ticket, and a browser must be able to call it) and the console's
    /// session route (it has no caller yet: it is how the console's page gets one; it takes
    /// JSON only, from the console's own origin).
    #[test]
    fn every_post_route_is_in_the_state_changing_table() {
        let api = openapi();
        for (path, item) in &api.paths.paths {
            let exception = path == "/v1/events/ticket" || path == console::SESSION_ROUTE;
            if item.post.is_some() && !exception {
                assert!(
                    state_changing(&Method::POST, path).is_some(),
                    "POST {path} is not in STATE_CHANGING"
                );
            }
        }
        assert_eq!(state_changing(&Method::GET, "/v1/revocations"), None);
    }

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
            bus: Bus::default(),
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
