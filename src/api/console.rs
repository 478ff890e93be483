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
//! 3. The session is a caller of its own: the scopes of the client that signed in, and as its
//!    only allowed origin the console's own. Every other rule (Host, token, scope) applies to it
//!    as to any client; configured clients do not gain the console's origin. It spends the
//!    shares of the client that signed in (its account: tickets, streams, revocations), and it
//!    cannot issue sign-in codes, so no chain of sessions multiplies them.
//!
//! Codes and sessions are counted per account, each account's flood evicting only its own
//! oldest; see [`Table::keep`].

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

use super::security::Identity;
use super::{ApiError, Listener, Refusals};

/// How long a sign-in code waits to be used (a browser may take a while to start).
const CODE_LIFETIME: Duration = Duration::from_secs(120);
/// How long a console session lasts: a helpdesk shift.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Outstanding codes and open sessions per account (a configured client or local user): a new
/// one beyond this replaces that account's oldest, so one caller's flood evicts only its own.
const CODES_PER_ACCOUNT: usize = 4;
const SESSIONS_PER_ACCOUNT: usize = 8;
/// Entries of all accounts together, so memory stays bounded whoever asks: past it, a new code
/// or session is refused (429) rather than taken from another account.
const MAX_ENTRIES: usize = 1024;

/// One table of secrets (codes or sessions), each kept as the SHA-256 of the secret with the
/// caller it stands for and when it expires.
#[derive(Debug)]
struct Table {
    entries: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
    per_account: usize,
}

impl Table {
    fn new(per_account: usize) -> Table {
        Table {
            entries: Mutex::default(),
            per_account,
        }
    }

    /// Keeps `identity` under `key` until `expires`, after dropping expired entries and, when its
    /// account has its share, that account's entry that expires first.
    fn keep(&self, key: [u8; 32], identity: Identity, expires: Instant) -> Result<(), ApiError> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, (_, e)| *e > now);
        let own = map
            .iter()
            .filter(|(_, (i, _))| i.account == identity.account);
        if own.clone().count() >= self.per_account {
            if let Some(oldest) = own.min_by_key(|(_, (_, e))| *e).map(|(k, _)| *k) {
                map.remove(&oldest);
            }
        } else if map.len() >= MAX_ENTRIES {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_sign_ins",
                "too many sign-in codes and console sessions are outstanding; try again later",
            ));
        }
        map.insert(key, (identity, expires));
        Ok(())
    }

    /// Takes the entry out (a code is good once), if it was still good.
    fn take(&self, key: &[u8; 32]) -> Option<Identity> {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (identity, expires) = map.remove(key)?;
        (expires > Instant::now()).then_some(identity)
    }

    fn find(&self, key: &[u8; 32]) -> Option<Identity> {
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(identity, _)| identity.clone())
    }
}

/// Sign-in codes and console sessions.
#[derive(Debug)]
pub struct Sessions {
    codes: Table,
    sessions: Table,
}

impl Default for Sessions {
    fn default() -> Sessions {
        Sessions {
            codes: Table::new(CODES_PER_ACCOUNT),
            sessions: Table::new(SESSIONS_PER_ACCOUNT),
        }
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Sessions {
    /// A one-time sign-in code for `owner`.
    fn issue_code(&self, owner: Identity) -> Result<String, ApiError> {
        let code = crate::random::random_hex::<16>().map_err(|_| no_randomness())?;
        let expires = Instant::now() + CODE_LIFETIME;
        self.codes.keep(digest(&code), owner, expires)?;
        Ok(code)
    }

    /// The caller a code was issued to; the code is spent whether or not it was still good.
    fn redeem_code(&self, code: &str) -> Option<Identity> {
        self.codes.take(&digest(code))
    }

    /// Opens a session for `owner` from the console at `origin`; returns its token. The session
    /// spends `owner`'s account.
    fn open(&self, owner: &Identity, origin: &str) -> Result<(String, Identity), ApiError> {
        let token = crate::random::random_hex::<32>().map_err(|_| no_randomness())?;
        let session = Identity {
            name: format!("{} (console)", owner.name),
            account: owner.account.clone(),
            scopes: owner.scopes.clone(),
            origins: vec![origin.to_string()],
            session: true,
        };
        let expires = Instant::now() + SESSION_LIFETIME;
        self.sessions
            .keep(digest(&token), session.clone(), expires)?;
        Ok((token, session))
    }

    /// The session whose token this is, while it lasts.
    pub fn find(&self, token: &str) -> Option<Identity> {
        self.sessions.find(&digest(token))
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
    Extension(caller): Extension<Identity>,
    body: Bytes,
) -> Response {
    // A session that could sign in would open sessions without end; the person signs in again
    // with `cardbridge console` instead.
    if caller.session {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "console_session",
            "a console session cannot issue sign-in codes; run `cardbridge console` to sign in",
        )
        .into_response();
    }
    let object = serde_json::from_slice::<serde_json::Value>(&body).is_ok_and(|v| v.is_object());
    if !body.is_empty() && !object {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            "the body must be a JSON object",
        )
        .into_response();
    }
    let owner = Identity {
        origins: Vec::new(),
        ..caller
    };
    let answer = match l.shared.clients.sessions().issue_code(owner) {
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
