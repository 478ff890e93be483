//! The local API's gatekeeping. Loopback is not a security boundary: any web page can make a
//! browser talk to 127.0.0.1, and DNS rebinding can make it do so under a foreign name. So every
//! request must carry a known bearer token (compared as SHA-256 in constant time), must name the
//! listener in its Host header, and, when it comes from a browser page (an Origin header), must
//! come from an origin allowed for that token's client. CORS answers echo only such an origin,
//! never `*`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use thiserror::Error;

use crate::config::{ApiClient, Scope};

/// Why a request is refused; each maps to a status and an error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    MissingToken,
    BadToken,
    ForeignHost,
    ForeignOrigin,
    MissingScope,
    BadTicket,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::MissingToken | Refusal::BadToken | Refusal::BadTicket => {
                StatusCode::UNAUTHORIZED
            }
            // 421 Misdirected Request: the Host names something this listener is not.
            Refusal::ForeignHost => StatusCode::MISDIRECTED_REQUEST,
            Refusal::ForeignOrigin | Refusal::MissingScope => StatusCode::FORBIDDEN,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Refusal::MissingToken => "missing_token",
            Refusal::BadToken => "bad_token",
            Refusal::ForeignHost => "foreign_host",
            Refusal::ForeignOrigin => "foreign_origin",
            Refusal::MissingScope => "missing_scope",
            Refusal::BadTicket => "bad_ticket",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::MissingToken => "an Authorization: Bearer token is required",
            Refusal::BadToken => "the bearer token is not known",
            Refusal::ForeignHost => "the Host header does not name this listener",
            Refusal::ForeignOrigin => "this origin is not allowed for this client",
            Refusal::MissingScope => "the client does not have the scope this route needs",
            Refusal::BadTicket => "the event ticket is unknown, already used or expired",
        }
    }
}

/// The configured clients, with their token hashes decoded, and the event tickets issued to them.
#[derive(Debug)]
pub struct Clients {
    clients: Vec<(ApiClient, [u8; 32])>,
    /// Outstanding tickets by SHA-256: the client's index and when the ticket expires.
    tickets: Mutex<HashMap<[u8; 32], (usize, Instant)>>,
}

/// How long an event ticket may wait to be used.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(30);
/// Tickets outstanding at once; a client asking for more gets 429 until some expire.
const MAX_TICKETS: usize = 1024;

impl Clients {
    pub fn new(clients: &[ApiClient]) -> Clients {
        Clients {
            clients: clients
                .iter()
                .filter_map(|c| {
                    let hash: [u8; 32] = hex::decode(&c.token_sha256).ok()?.try_into().ok()?;
                    Some((c.clone(), hash))
                })
                .collect(),
            tickets: Mutex::default(),
        }
    }

    /// The client whose token this is. Every configured hash is compared, in constant time, so
    /// the time taken says nothing about which one (or how much of one) matched.
    pub fn authenticate(&self, token: &str) -> Option<&ApiClient> {
        self.index_of(token).map(|i| &self.clients[i].0)
    }

    fn index_of(&self, token: &str) -> Option<usize> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for (i, (_, hash)) in self.clients.iter().enumerate() {
            if bool::from(presented.ct_eq(hash)) {
                found = Some(i);
            }
        }
        found
    }

    /// A one-time ticket for the client whose bearer token `headers` carry, so that a browser
    /// `EventSource` (which cannot send headers) can open `/v1/events?ticket=…`. The ticket is
    /// random, kept only as a hash, good once and for [`TICKET_LIFETIME`].
    pub fn issue_ticket(&self, headers: &HeaderMap) -> Result<String, TicketError> {
        let index = bearer(headers)
            .and_then(|t| self.index_of(t))
            .ok_or(TicketError::NoToken)?;
        let ticket = crate::random::random_hex::<32>().map_err(|_| TicketError::NoRandomness)?;
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        tickets.retain(|_, (_, expires)| *expires > now);
        if tickets.len() >= MAX_TICKETS {
            return Err(TicketError::TooMany);
        }
        tickets.insert(
            Sha256::digest(ticket.as_bytes()).into(),
            (index, now + TICKET_LIFETIME),
        );
        Ok(ticket)
    }

    /// The client a ticket was issued to; the ticket is spent whether or not it was still good.
    fn redeem(&self, ticket: &str) -> Option<&ApiClient> {
        let key: [u8; 32] = Sha256::digest(ticket.as_bytes()).into();
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let (index, expires) = tickets.remove(&key)?;
        (expires > Instant::now()).then(|| &self.clients[index].0)
    }
}

/// Why no event ticket was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TicketError {
    #[error("tickets are issued to callers with a bearer token")]
    NoToken,
    #[error("too many outstanding tickets; use or let some expire first")]
    TooMany,
    #[error("the system's random source failed")]
    NoRandomness,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Throttles failed authentication per caller, where a caller is the browser origin that sent
/// the request (every loopback caller has the same address; a web page probing for tokens always
/// has its origin). Token buckets: a burst of 20 failures, then 5 per second; a caller over the
/// limit is answered 429 before its token is even looked at.
#[derive(Default)]
pub struct FailureLimiter {
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

const FAILURE_BURST: f64 = 20.0;
const FAILURES_PER_SECOND: f64 = 5.0;

impl FailureLimiter {
    fn key(headers: &HeaderMap) -> String {
        headers
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .unwrap_or("(no origin)")
            .to_string()
    }

    fn with_bucket<T>(&self, headers: &HeaderMap, f: impl FnOnce(&mut f64) -> T) -> T {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let (tokens, last) = buckets
            .entry(Self::key(headers))
            .or_insert((FAILURE_BURST, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * FAILURES_PER_SECOND)
            .min(FAILURE_BURST);
        *last = now;
        f(tokens)
    }

    /// Whether this caller may try to authenticate now.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        self.with_bucket(headers, |tokens| *tokens >= 1.0)
    }

    /// Counts a failed attempt.
    pub fn failed(&self, headers: &HeaderMap) {
        self.with_bucket(headers, |tokens| *tokens = (*tokens - 1.0).max(0.0));
    }
}

/// The Host values a request to `listener` may carry: `127.0.0.1:PORT`, `localhost:PORT`,
/// `[::1]:PORT` for the listener's port.
pub fn host_allowed(host: Option<&HeaderValue>, listener: SocketAddr) -> bool {
    let Some(host) = host.and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let port = listener.port();
    let host = host.to_ascii_lowercase();
    [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
    ]
    .contains(&host)
}

/// Host, credentials and Origin: who is calling, if they may call at all. The credentials are
/// the bearer token or, when there is none, an event `ticket` (only offered for `/v1/events`).
pub fn identify<'c>(
    clients: &'c Clients,
    headers: &HeaderMap,
    listener: SocketAddr,
    ticket: Option<&str>,
) -> Result<&'c ApiClient, Refusal> {
    if !host_allowed(headers.get(header::HOST), listener) {
        return Err(Refusal::ForeignHost);
    }
    let client = match (bearer(headers), ticket) {
        (Some(token), _) => clients.authenticate(token).ok_or(Refusal::BadToken)?,
        (None, Some(ticket)) => clients.redeem(ticket).ok_or(Refusal::BadTicket)?,
        (None, None) => return Err(Refusal::MissingToken),
    };
    if let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = origin
            .to_str()
            .is_ok_and(|o| client.origins.iter().any(|allowed| allowed == o));
        if !allowed {
            return Err(Refusal::ForeignOrigin);
        }
    }
    Ok(client)
}

/// Whether an identified caller's scopes include `scope`.
pub fn authorize(scopes: &[Scope], scope: Scope) -> Result<(), Refusal> {
    if scopes.contains(&scope) {
        Ok(())
    } else {
        Err(Refusal::MissingScope)
    }
}

/// The scopes of a process on the Unix socket: every `local_users` entry that names its uid or
/// its gid contributes. None at all: the caller is refused.
pub fn local_scopes(users: &[crate::config::LocalUser], uid: u32, gid: u32) -> Vec<Scope> {
    let mut scopes: Vec<Scope> = users
        .iter()
        .filter(|u| u.uid == Some(uid) || u.gid == Some(gid))
        .flat_map(|u| u.scopes.iter().copied())
        .collect();
    scopes.sort_by_key(|s| *s as u8);
    scopes.dedup();
    scopes
}

/// A CORS preflight is answered for an origin some client allows (it carries no token, so the
/// request itself is checked when it comes). Returns the origin to echo.
pub fn preflight_origin(
    clients: &Clients,
    headers: &HeaderMap,
    method: &Method,
) -> Option<HeaderValue> {
    if method != Method::OPTIONS {
        return None;
    }
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    clients
        .clients
        .iter()
        .any(|(c, _)| c.origins.iter().any(|o| o == text))
        .then(|| origin.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients() -> Clients {
        Clients::new(&[ApiClient {
            name: "kiosk".into(),
            token_sha256: hex::encode(Sha256::digest(b"s3cret")),
            scopes: vec![Scope::Read],
            origins: vec!["https://kiosk.contoso.com".into()],
        }])
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const LISTENER: &str = "127.0.0.1:8687";

    /// Checks a request's headers: Host, bearer token, Origin, scope. Returns the client.
    fn check<'c>(
        clients: &'c Clients,
        headers: &HeaderMap,
        listener: SocketAddr,
        scope: Scope,
    ) -> Result<&'c ApiClient, Refusal> {
        let client = identify(clients, headers, listener, None)?;
        authorize(&client.scopes, scope)?;
        Ok(client)
    }

    #[test]
    fn an_event_ticket_is_good_once_and_carries_the_client() {
        let c = clients();
        let l: SocketAddr = LISTENER.parse().unwrap();
        assert_eq!(c.issue_ticket(&HeaderMap::new()), Err(TicketError::NoToken));
        let ticket = c
            .issue_ticket(&headers(&[(header::AUTHORIZATION, "Bearer s3cret")]))
            .unwrap();
        let page = headers(&[
            (header::HOST, "127.0.0.1:8687"),
            (header::ORIGIN, "https://kiosk.contoso.com"),
        ]);
        let foreign = headers(&[
            (header::HOST, "127.0.0.1:8687"),
            (header::ORIGIN, "https://evil.example"),
        ]);
        // A foreign origin spends the ticket without getting in.
        let second = c
            .issue_ticket(&headers(&[(header::AUTHORIZATION, "Bearer s3cret")]))
            .unwrap();
        assert_eq!(
            identify(&c, &foreign, l, Some(&second)).err(),
            Some(Refusal::ForeignOrigin)
        );
        assert_eq!(
            identify(&c, &page, l, Some(&second)).err(),
            Some(Refusal::BadTicket)
        );
        assert_eq!(
            identify(&c, &page, l, Some(&ticket)).map(|c| c.name.as_str()),
            Ok("kiosk")
        );
        assert_eq!(
            identify(&c, &page, l, Some(&ticket)).err(),
            Some(Refusal::BadTicket)
        );
        assert_eq!(
            identify(&c, &page, l, Some("00")).err(),
            Some(Refusal::BadTicket)
        );
    }

    #[test]
    fn every_rule() {
        let c = clients();
        let l: SocketAddr = LISTENER.parse().unwrap();
        let ok = [
            (header::HOST, "localhost:8687"),
            (header::AUTHORIZATION, "Bearer s3cret"),
        ];
        assert_eq!(
            check(&c, &headers(&ok), l, Scope::Read).map(|c| c.name.as_str()),
            Ok("kiosk")
        );
        let cases: [(&[(header::HeaderName, &str)], Refusal); 6] = [
            (&[(header::HOST, "localhost:8687")], Refusal::MissingToken),
            (
                &[
                    (header::HOST, "127.0.0.1:8687"),
                    (header::AUTHORIZATION, "Bearer nope"),
                ],
                Refusal::BadToken,
            ),
            (
                &[
                    (header::HOST, "evil.example:8687"),
                    (header::AUTHORIZATION, "Bearer s3cret"),
                ],
                Refusal::ForeignHost,
            ),
            (
                &[
                    (header::HOST, "localhost:9999"),
                    (header::AUTHORIZATION, "Bearer s3cret"),
                ],
                Refusal::ForeignHost,
            ),
            (
                &[
                    (header::HOST, "[::1]:8687"),
                    (header::AUTHORIZATION, "Bearer s3cret"),
                    (header::ORIGIN, "https://evil.example"),
                ],
                Refusal::ForeignOrigin,
            ),
            (
                &[(header::AUTHORIZATION, "Bearer s3cret")],
                Refusal::ForeignHost,
            ),
        ];
        for (h, refusal) in cases {
            assert_eq!(
                check(&c, &headers(h), l, Scope::Read).err(),
                Some(refusal),
                "{h:?}"
            );
        }
        assert_eq!(
            check(&c, &headers(&ok), l, Scope::Revoke).err(),
            Some(Refusal::MissingScope)
        );
        let from_page = [
            (header::HOST, "127.0.0.1:8687"),
            (header::AUTHORIZATION, "Bearer s3cret"),
            (header::ORIGIN, "https://kiosk.contoso.com"),
        ];
        assert!(check(&c, &headers(&from_page), l, Scope::Read).is_ok());
    }

    #[test]
    fn failed_authentication_is_throttled_per_origin() {
        let limiter = FailureLimiter::default();
        let page = headers(&[(header::ORIGIN, "https://evil.example")]);
        for _ in 0..FAILURE_BURST as usize {
            assert!(limiter.allows(&page));
            limiter.failed(&page);
        }
        assert!(!limiter.allows(&page));
        // Native callers (no origin) are not affected by a page's failures.
        assert!(limiter.allows(&HeaderMap::new()));
    }

    #[test]
    fn local_users_map_to_scopes() {
        let users = [
            crate::config::LocalUser {
                uid: Some(1000),
                gid: None,
                scopes: vec![Scope::Read],
            },
            crate::config::LocalUser {
                uid: None,
                gid: Some(50),
                scopes: vec![Scope::Sync, Scope::Read],
            },
        ];
        assert_eq!(local_scopes(&users, 1000, 1000), [Scope::Read]);
        assert_eq!(local_scopes(&users, 1000, 50), [Scope::Read, Scope::Sync]);
        assert!(local_scopes(&users, 1001, 1001).is_empty());
    }

    #[test]
    fn preflight_echoes_only_allowed_origins() {
        let c = clients();
        let good = headers(&[(header::ORIGIN, "https://kiosk.contoso.com")]);
        assert_eq!(
            preflight_origin(&c, &good, &Method::OPTIONS).unwrap(),
            "https://kiosk.contoso.com"
        );
        let bad = headers(&[(header::ORIGIN, "https://evil.example")]);
        assert_eq!(preflight_origin(&c, &bad, &Method::OPTIONS), None);
    }
}
