//! The helpdesk console: a small web page served at `/` on the API listener, its assets embedded
//! in the binary (no CDN; it works offline), and its sign-in.
//!
//! Signing in never puts a token in a URL that stays in history:
//! 1. `cardbridge console` (a client with its own token) asks `POST /v1/console/sign-in` for a
//!    one-time code and prints `http://127.0.0.1:8687/#code=…`. A fragment is never sent to a
//!    server, and the code is good once, for two minutes.
//! 2. The page trades the code (or a token a person types) for a session token with
//!    `POST /v1/console/session`, then drops the fragment from the address bar. The session
//!    token lives in the tab's `sessionStorage` only.
//! 3. The session is a client of its own: the scopes of the client that signed in, and as its
//!    only allowed origin the console's own. Every other rule (Host, token, scope) applies to it
//!    as to any client; configured clients do not gain the console's origin.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{ApiError, Caller, Listener, Refusals};
use crate::config::{ApiClient, Scope};

/// How long a sign-in code waits to be used (a browser may take a while to start).
const CODE_LIFETIME: Duration = Duration::from_secs(120);
/// How long a console session lasts: a helpdesk shift.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Outstanding codes and sessions, each: the oldest goes when a new one would exceed this.
const MAX_ENTRIES: usize = 64;

/// Sign-in codes and console sessions, each kept as the SHA-256 of its secret with the client it
/// stands for and when it expires.
#[derive(Debug, Default)]
pub struct Sessions {
    codes: Mutex<HashMap<[u8; 32], (ApiClient, Instant)>>,
    sessions: Mutex<HashMap<[u8; 32], (ApiClient, Instant)>>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Keeps `entry` under `key`, dropping expired entries and, when full, the one that expires
/// first.
fn keep(
    map: &Mutex<HashMap<[u8; 32], (ApiClient, Instant)>>,
    key: [u8; 32],
    entry: (ApiClient, Instant),
) {
    let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    map.retain(|_, (_, expires)| *expires > now);
    if map.len() >= MAX_ENTRIES {
        if let Some(oldest) = map.iter().min_by_key(|(_, (_, e))| *e).map(|(k, _)| *k) {
            map.remove(&oldest);
        }
    }
    map.insert(key, entry);
}

impl Sessions {
    /// A one-time sign-in code for `client`.
    fn issue_code(&self, client: ApiClient) -> Result<String, ApiError> {
        let code = crate::random::random_hex::<16>().map_err(|_| no_randomness())?;
        keep(
            &self.codes,
            digest(&code),
            (client, Instant::now() + CODE_LIFETIME),
        );
        Ok(code)
    }

    /// The client a code was issued to; the code is spent whether or not it was still good.
    fn redeem_code(&self, code: &str) -> Option<ApiClient> {
        let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        let (client, expires) = codes.remove(&digest(code))?;
        (expires > Instant::now()).then_some(client)
    }

    /// Opens a session for `client` from the console at `origin`; returns its token.
    fn open(&self, client: &ApiClient, origin: &str) -> Result<(String, ApiClient), ApiError> {
        let token = crate::random::random_hex::<32>().map_err(|_| no_randomness())?;
        let session = ApiClient {
            name: format!("{} (console)", client.name),
            token_sha256: String::new(),
            scopes: client.scopes.clone(),
            origins: vec![origin.to_string()],
        };
        let expires = Instant::now() + SESSION_LIFETIME;
        keep(&self.sessions, digest(&token), (session.clone(), expires));
        Ok((token, session))
    }

    /// The session whose token this is, while it lasts.
    pub fn find(&self, token: &str) -> Option<ApiClient> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(&digest(token))
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(client, _)| client.clone())
    }
}

fn no_randomness() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no_randomness",
        "the system's random source failed",
    )
}

/// `POST /v1/console/sign-in`: a one-time code that opens a console session with the caller's
/// scopes (what `cardbridge console` prints as a URL).
#[utoipa::path(post, path = "/v1/console/sign-in", request_body(content = Object, content_type = "application/json", description = "An empty JSON object"), responses(Refusals, (status = 201, description = "{\"code\", \"path\": \"/#code=…\", \"expires_in_s\"}: open the path on this listener within two minutes"), (status = 400, description = "The body is not a JSON object"), (status = 415, description = "Not application/json")))]
pub(super) async fn sign_in(
    State(l): State<Listener>,
    Extension(Caller(name)): Extension<Caller>,
    Extension(scopes): Extension<CallerScopes>,
    body: Bytes,
) -> Response {
    let object = serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| v.is_object());
    if !body.is_empty() && !object {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "the body must be a JSON object",
        )
        .into_response();
    }
    let client = ApiClient {
        name,
        token_sha256: String::new(),
        scopes: scopes.0,
        origins: Vec::new(),
    };
    let answer = match l.shared.clients.sessions().issue_code(client) {
        Ok(code) => (
            StatusCode::CREATED,
            Json(json!({"code": code, "path": format!("/#code={code}"), "expires_in_s": CODE_LIFETIME.as_secs()})),
        )
            .into_response(),
        Err(e) => e.into_response(),
    };
    no_store(answer)
}

/// Marks an answer that carries a sign-in code or a session token as one no cache may keep (a
/// browser's, a proxy's): it is a credential.
fn no_store(mut answer: Response) -> Response {
    answer
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    answer
}

/// The caller's scopes, as the gate found them (for routes that hand them on).
#[derive(Debug, Clone)]
pub struct CallerScopes(pub Vec<Scope>);

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SessionRequest {
    /// A sign-in code from `cardbridge console`.
    code: Option<String>,
    /// Or an API client's token, typed by a person.
    token: Option<String>,
}

/// `POST /v1/console/session`: trades a sign-in code (or a client's token) for a console
/// session. Only the console's own page may ask: the Origin must be this listener's.
#[utoipa::path(post, path = "/v1/console/session", request_body(content = inline(SessionRequest), content_type = "application/json"), responses(Refusals, (status = 201, description = "{\"token\", \"client\", \"scopes\", \"expires_in_s\"}"), (status = 400, description = "Neither code nor token"), (status = 401, description = "The code is unknown, used or expired, or the token unknown"), (status = 403, description = "Not the console's own page (Origin)"), (status = 408, description = "The request, its body included, took longer than 2 s"), (status = 413, description = "The body is larger than 1 KiB"), (status = 415, description = "Not application/json"), (status = 503, description = "16 session requests are being handled already; try again shortly")))]
pub(super) async fn session(
    State(l): State<Listener>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    no_store(session_steps(&l, &headers, &body).unwrap_or_else(IntoResponse::into_response))
}

/// Reads a `POST /v1/console/session` body: `{"code"}` or `{"token"}`.
pub(crate) fn parse_session_request(body: &[u8]) -> Result<SessionRequest, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("expected {{\"code\"}} or {{\"token\"}}: {e}"),
        )
    })
}

fn session_steps(l: &Listener, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let origin = own_origin(headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "foreign_origin",
            "a console session is opened by the console's own page only",
        )
    })?;
    let request = parse_session_request(body)?;
    let clients = &l.shared.clients;
    let client = match (&request.code, &request.token) {
        (Some(code), None) => clients.sessions().redeem_code(code),
        (None, Some(token)) => clients.configured(token),
        _ => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "give either a sign-in code or a token",
            ))
        }
    };
    let Some(client) = client else {
        // Guessing codes or tokens spends the same budget as wrong tokens elsewhere.
        if !l.shared.failures.spend(Instant::now()) {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_failures",
                "too many failed authentications; wait and retry",
            ));
        }
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "bad_sign_in",
            "the sign-in code is unknown, used or expired, or the token is not known",
        ));
    };
    let (token, session) = clients.sessions().open(&client, &origin)?;
    tracing::info!(client = %client.name, "console session opened");
    let scopes: Vec<&str> = session.scopes.iter().map(|s| s.as_str()).collect();
    Ok((
        StatusCode::CREATED,
        Json(
            json!({"token": token, "client": session.name, "scopes": scopes,
                    "expires_in_s": SESSION_LIFETIME.as_secs()}),
        ),
    )
        .into_response())
}

/// The request's Origin when it is this listener's own (`http://` + the Host the gate checked).
fn own_origin(headers: &HeaderMap) -> Option<String> {
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    let host = headers.get(header::HOST)?.to_str().ok()?;
    (origin == format!("http://{host}")).then(|| origin.to_string())
}

/// The page and its assets, embedded at build time.
const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/console.js");
const STYLE: &str = include_str!("console/console.css");

/// The console's files: only these paths, only from this binary.
pub(super) fn asset(path: &str) -> Option<Response> {
    let (body, kind) = match path {
        "/" | "/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/console.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/console.css" => (STYLE, "text/css; charset=utf-8"),
        _ => return None,
    };
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Some(response)
}

/// A path the console serves without a token (the Host rule still applies).
pub(super) fn is_public(method: &axum::http::Method, path: &str) -> bool {
    (method == axum::http::Method::GET
        && matches!(path, "/" | "/index.html" | "/console.js" | "/console.css"))
        || (method == axum::http::Method::POST && path == SESSION_ROUTE)
}

pub(super) const SESSION_ROUTE: &str = "/v1/console/session";
