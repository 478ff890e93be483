//! The gate every request passes before its handler: the request target's length, the
//! console's public routes, CORS preflights, who the caller is (bearer token, event ticket, or
//! the Unix socket peer), the scope the route needs, JSON for state-changing calls, the audit
//! trail and CORS headers on the answer. The rules themselves are in [`super::security`].

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{console, error, security, serve, Kind, Listener};
use crate::config::Scope;

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

/// Preflights for allowed origins, then the security check of every request, then CORS headers
/// (the exact origin, never `*`) on the answer.
pub(super) async fn gate(State(l): State<Listener>, request: Request, next: Next) -> Response {
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
pub(super) fn query_value<'q>(query: Option<&'q str>, key: &str) -> Option<&'q str> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A POST route missing from `STATE_CHANGING` would need only `read`, skip the JSON-only
    /// rule and go unaudited. Two deliberate exceptions: the ticket route (it changes nothing
    /// but the caller's own ticket, and a browser must be able to call it) and the console's
    /// session route (it has no caller yet: it is how the console's page gets one; it takes
    /// JSON only, from the console's own origin).
    #[test]
    fn every_post_route_is_in_the_state_changing_table() {
        let api = super::super::openapi();
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
}
