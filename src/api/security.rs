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
    /// More than one Host header (RFC 9112 §3.2: answer 400).
    DuplicateHost,
    ForeignOrigin,
    MissingScope,
    BadTicket,
    /// A wrong token or ticket while the daemon's budget of failures is spent.
    TooManyFailures,
}

impl Refusal {
    pub fn status(self) -> StatusCode {
        match self {
            Refusal::MissingToken | Refusal::BadToken | Refusal::BadTicket => {
                StatusCode::UNAUTHORIZED
            }
            // 421 Misdirected Request: the Host names something this listener is not.
            Refusal::ForeignHost => StatusCode::MISDIRECTED_REQUEST,
            Refusal::DuplicateHost => StatusCode::BAD_REQUEST,
            Refusal::ForeignOrigin | Refusal::MissingScope => StatusCode::FORBIDDEN,
            Refusal::TooManyFailures => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Refusal::MissingToken => "missing_token",
            Refusal::BadToken => "bad_token",
            Refusal::ForeignHost => "foreign_host",
            Refusal::DuplicateHost => "duplicate_host",
            Refusal::ForeignOrigin => "foreign_origin",
            Refusal::MissingScope => "missing_scope",
            Refusal::BadTicket => "bad_ticket",
            Refusal::TooManyFailures => "too_many_failures",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refusal::MissingToken => "an Authorization: Bearer token is required",
            Refusal::BadToken => "the bearer token is not known",
            Refusal::ForeignHost => "the Host header does not name this listener",
            Refusal::DuplicateHost => "a request carries exactly one Host header",
            Refusal::TooManyFailures => "too many failed authentications; wait and retry",
            Refusal::ForeignOrigin => "this origin is not allowed for this client",
            Refusal::MissingScope => "the client does not have the scope this route needs",
            Refusal::BadTicket => "the event ticket is unknown, already used or expired",
        }
    }
}

/// A caller the gate let in: a configured client, a console session, or (on the Unix socket) a
/// local user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// What audits and logs show: `helpdesk`, `helpdesk (console)`, `uid 1000`.
    pub name: String,
    /// Whose shares this caller spends (event tickets and streams, revocations, sign-in codes,
    /// console sessions): itself, or the configured client that signed a console session in.
    /// So a chain of sessions has one client's shares, not one each.
    pub account: String,
    pub scopes: Vec<Scope>,
    /// Exact origins its browser pages may call from.
    pub origins: Vec<String>,
    /// A console session, which may not issue sign-in codes (and so cannot open more sessions).
    pub session: bool,
}

impl Identity {
    fn configured(client: &ApiClient) -> Identity {
        Identity {
            name: client.name.clone(),
            account: client.name.clone(),
            scopes: client.scopes.clone(),
            origins: client.origins.clone(),
            session: false,
        }
    }

    /// A process on the Unix socket, known by its uid.
    pub fn local(uid: u32, scopes: Vec<Scope>) -> Identity {
        let name = format!("uid {uid}");
        Identity {
            account: name.clone(),
            name,
            scopes,
            origins: Vec::new(),
            session: false,
        }
    }
}

/// The configured clients, with their token hashes decoded, the event tickets issued to them,
/// and the helpdesk console's sessions.
#[derive(Debug)]
pub struct Clients {
    clients: Vec<(ApiClient, [u8; 32])>,
    /// Outstanding tickets by SHA-256: the caller and when the ticket expires.
    tickets: Mutex<HashMap<[u8; 32], (Identity, Instant)>>,
    sessions: super::console::Sessions,
}

/// How long an event ticket may wait to be used.
pub const TICKET_LIFETIME: Duration = Duration::from_secs(30);
/// Tickets outstanding at once, and per account: a client (with all its console sessions) asking
/// for more gets 429 until some of its own expire, so it cannot keep the others' pages from
/// their event streams.
const MAX_TICKETS: usize = 1024;
const MAX_TICKETS_PER_CLIENT: usize = 32;

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
            sessions: Default::default(),
        }
    }

    /// The client whose token this is: a configured client, or a console session. Every
    /// configured hash is compared, in constant time, so the time taken says nothing about which
    /// one (or how much of one) matched.
    pub fn authenticate(&self, token: &str) -> Option<Identity> {
        self.configured(token).or_else(|| self.sessions.find(token))
    }

    /// A configured client (not a console session) by its token.
    pub fn configured(&self, token: &str) -> Option<Identity> {
        self.index_of(token)
            .map(|i| Identity::configured(&self.clients[i].0))
    }

    /// The helpdesk console's sign-in codes and sessions.
    pub fn sessions(&self) -> &super::console::Sessions {
        &self.sessions
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

    /// A one-time ticket for `caller`, so that a browser `EventSource` (which cannot send
    /// headers) can open `/v1/events?ticket=…`. The ticket is random, kept only as a hash, good
    /// once and for [`TICKET_LIFETIME`].
    pub fn issue_ticket(&self, caller: &Identity) -> Result<String, TicketError> {
        let ticket = crate::random::random_hex::<32>().map_err(|_| TicketError::NoRandomness)?;
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        tickets.retain(|_, (_, expires)| *expires > now);
        let own = tickets
            .values()
            .filter(|(c, _)| c.account == caller.account)
            .count();
        if own >= MAX_TICKETS_PER_CLIENT || tickets.len() >= MAX_TICKETS {
            return Err(TicketError::TooMany);
        }
        tickets.insert(
            Sha256::digest(ticket.as_bytes()).into(),
            (caller.clone(), now + TICKET_LIFETIME),
        );
        Ok(ticket)
    }

    /// The client a ticket was issued to; the ticket is spent whether or not it was still good.
    fn redeem(&self, ticket: &str) -> Option<Identity> {
        let key: [u8; 32] = Sha256::digest(ticket.as_bytes()).into();
        let mut tickets = self.tickets.lock().unwrap_or_else(|p| p.into_inner());
        let (client, expires) = tickets.remove(&key)?;
        (expires > Instant::now()).then_some(client)
    }
}

/// Why no event ticket was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TicketError {
    #[error("too many outstanding tickets; use or let some expire first")]
    TooMany,
    #[error("the system's random source failed")]
    NoRandomness,
}

/// The token of an `Authorization: Bearer …` header; the scheme is case-insensitive (RFC 9110
/// §11.1), and spaces or tabs may follow it.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The daemon's budget of failed authentications: a burst of 20, then 5 per second, for all
/// callers together (a token bucket, so its memory is one number whatever callers send).
///
/// Why this shape: a valid token is looked up first and always served, so no caller's failures
/// can lock out the station's own CLI, kiosk apps or Prometheus; a request without credentials
/// is not a guess and costs nothing (a web page's `<img>` tags send such requests). Only a
/// wrong token or ticket spends the budget, and once it is spent wrong ones are answered 429
/// and their connection closed, whatever `Origin` they claim: no header an attacker chooses
/// buys a fresh budget. The budget bounds the wrong guesses the daemon answers; what makes
/// guessing futile is the token itself (256 random bits when generated; the README asks for
/// `openssl rand -hex 32`).
pub struct FailureBudget {
    bucket: Mutex<TokenBucket>,
}

const FAILURE_BURST: f64 = 20.0;
const FAILURES_PER_SECOND: f64 = 5.0;

impl Default for FailureBudget {
    fn default() -> Self {
        FailureBudget {
            bucket: Mutex::new(TokenBucket::new(
                FAILURE_BURST,
                FAILURES_PER_SECOND,
                Instant::now(),
            )),
        }
    }
}

impl FailureBudget {
    /// Spends one failure at `now`; false when the budget was already spent.
    pub fn spend(&self, now: Instant) -> bool {
        let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        bucket.take(now).is_ok()
    }
}

/// A token bucket: `burst` at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
    burst: f64,
    per_second: f64,
}

impl TokenBucket {
    pub fn new(burst: f64, per_second: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: burst,
            last: now,
            burst,
            per_second,
        }
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now.max(self.last);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / self.per_second.max(f64::MIN_POSITIVE);
        Err(Duration::from_secs_f64(wait.min(86_400.0)))
    }
}

/// The Host values a request to `listener` may carry: `127.0.0.1:PORT`, `localhost:PORT`,
/// `[::1]:PORT` for the listener's port.
pub fn host_allowed(host: Option<&str>, listener: SocketAddr) -> bool {
    let Some(host) = host else {
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

/// Exactly one Host header naming the listener; in an absolute-form request line the URI's
/// authority counts instead of Host (RFC 9112 §3.2.2), so it must name the listener too.
pub fn check_host(
    headers: &HeaderMap,
    authority: Option<&str>,
    listener: SocketAddr,
) -> Result<(), Refusal> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = hosts.next().and_then(|h| h.to_str().ok());
    if hosts.next().is_some() {
        return Err(Refusal::DuplicateHost);
    }
    if !host_allowed(host, listener) || authority.is_some_and(|a| !host_allowed(Some(a), listener))
    {
        return Err(Refusal::ForeignHost);
    }
    Ok(())
}

/// Host, credentials and Origin: who is calling, if they may call at all. The credentials are
/// the bearer token or, when there is none, an event `ticket` (only offered for `/v1/events`).
/// A wrong token or ticket spends the failure budget; over it, the refusal is 429.
pub fn identify(
    clients: &Clients,
    failures: &FailureBudget,
    request: &RequestParts<'_>,
    listener: SocketAddr,
) -> Result<Identity, Refusal> {
    check_host(request.headers, request.authority, listener)?;
    let found = match (bearer(request.headers), request.ticket) {
        (Some(token), _) => clients.authenticate(token).ok_or(Refusal::BadToken),
        (None, Some(ticket)) => clients.redeem(ticket).ok_or(Refusal::BadTicket),
        (None, None) => Err(Refusal::MissingToken),
    };
    let client = match found {
        Ok(client) => client,
        Err(Refusal::MissingToken) => return Err(Refusal::MissingToken),
        Err(refusal) if failures.spend(Instant::now()) => return Err(refusal),
        Err(_) => return Err(Refusal::TooManyFailures),
    };
    if let Some(origin) = request.headers.get(header::ORIGIN) {
        let allowed = origin
            .to_str()
            .is_ok_and(|o| client.origins.iter().any(|allowed| allowed == o));
        if !allowed {
            return Err(Refusal::ForeignOrigin);
        }
    }
    Ok(client)
}

/// What [`identify`] looks at in a request.
pub struct RequestParts<'r> {
    pub headers: &'r HeaderMap,
    /// The authority of an absolute-form request target, if it was one.
    pub authority: Option<&'r str>,
    /// The event ticket, where one stands in for the token.
    pub ticket: Option<&'r str>,
}

/// Whether an identified caller's scopes include `scope`.
pub fn authorize(scopes: &[Scope], scope: Scope) -> Result<(), Refusal> {
    if scopes.contains(&scope) {
        Ok(())
    } else {
        Err(Refusal::MissingScope)
    }
}

/// The scopes of a process on the Unix socket: every `local_users` entry that names its uid,
/// its gid or one of its supplementary groups contributes. None at all: the caller is refused.
pub fn local_scopes(
    users: &[crate::config::LocalUser],
    uid: u32,
    gid: u32,
    groups: &[u32],
) -> Vec<Scope> {
    let mut scopes: Vec<Scope> = users
        .iter()
        .filter(|u| u.uid == Some(uid) || u.gid.is_some_and(|g| g == gid || groups.contains(&g)))
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
    allowed_origin(clients, headers)
}

/// The request's Origin when some client allows it: the only origin a CORS header may echo.
pub fn allowed_origin(clients: &Clients, headers: &HeaderMap) -> Option<HeaderValue> {
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

    fn parts<'r>(headers: &'r HeaderMap, ticket: Option<&'r str>) -> RequestParts<'r> {
        RequestParts {
            headers,
            authority: None,
            ticket,
        }
    }

    /// Checks a request's headers: Host, bearer token, Origin, scope. Returns the client.
    fn check(
        clients: &Clients,
        headers: &HeaderMap,
        listener: SocketAddr,
        scope: Scope,
    ) -> Result<Identity, Refusal> {
        let client = identify(
            clients,
            &FailureBudget::default(),
            &parts(headers, None),
            listener,
        )?;
        authorize(&client.scopes, scope)?;
        Ok(client)
    }

    fn with_ticket(
        c: &Clients,
        h: &HeaderMap,
        l: SocketAddr,
        t: &str,
    ) -> Result<Identity, Refusal> {
        identify(c, &FailureBudget::default(), &parts(h, Some(t)), l)
    }

    #[test]
    fn an_event_ticket_is_good_once_and_carries_the_client() {
        let c = clients();
        let l: SocketAddr = LISTENER.parse().unwrap();
        let kiosk = c.configured("s3cret").unwrap();
        let ticket = c.issue_ticket(&kiosk).unwrap();
        let page = headers(&[
            (header::HOST, "127.0.0.1:8687"),
            (header::ORIGIN, "https://kiosk.contoso.com"),
        ]);
        let foreign = headers(&[
            (header::HOST, "127.0.0.1:8687"),
            (header::ORIGIN, "https://evil.example"),
        ]);
        // A foreign origin spends the ticket without getting in.
        let second = c.issue_ticket(&kiosk).unwrap();
        assert_eq!(
            with_ticket(&c, &foreign, l, &second).err(),
            Some(Refusal::ForeignOrigin)
        );
        assert_eq!(
            with_ticket(&c, &page, l, &second).err(),
            Some(Refusal::BadTicket)
        );
        assert_eq!(
            with_ticket(&c, &page, l, &ticket).map(|c| c.name),
            Ok("kiosk".to_string())
        );
        assert_eq!(
            with_ticket(&c, &page, l, &ticket).err(),
            Some(Refusal::BadTicket)
        );
        assert_eq!(
            with_ticket(&c, &page, l, "00").err(),
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
            check(&c, &headers(&ok), l, Scope::Read).map(|c| c.name),
            Ok("kiosk".to_string())
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
    fn the_failure_budget_is_one_for_everyone_and_refills() {
        let budget = FailureBudget::default();
        let start = Instant::now();
        for _ in 0..FAILURE_BURST as usize {
            assert!(budget.spend(start));
        }
        assert!(!budget.spend(start), "spent, whoever asks");
        assert!(!budget.spend(start + Duration::from_millis(100)));
        assert!(
            budget.spend(start + Duration::from_millis(300)),
            "5 per second come back"
        );
        assert!(!budget.spend(start + Duration::from_millis(300)));
        assert!(budget.spend(start + Duration::from_secs(60)));
    }

    #[test]
    fn a_valid_token_is_served_when_the_budget_is_spent() {
        let c = clients();
        let l: SocketAddr = LISTENER.parse().unwrap();
        let budget = FailureBudget::default();
        let now = Instant::now();
        while budget.spend(now) {}
        let good = headers(&[
            (header::HOST, "127.0.0.1:8687"),
            (header::AUTHORIZATION, "Bearer s3cret"),
        ]);
        assert!(identify(&c, &budget, &parts(&good, None), l).is_ok());
        let bad = headers(&[
            (header::HOST, "127.0.0.1:8687"),
            (header::AUTHORIZATION, "Bearer nope"),
        ]);
        assert_eq!(
            identify(&c, &budget, &parts(&bad, None), l).err(),
            Some(Refusal::TooManyFailures)
        );
        let none = headers(&[(header::HOST, "127.0.0.1:8687")]);
        assert_eq!(
            identify(&c, &budget, &parts(&none, None), l).err(),
            Some(Refusal::MissingToken)
        );
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_host_is_one_header() {
        let c = clients();
        let l: SocketAddr = LISTENER.parse().unwrap();
        for auth in [
            "bearer s3cret",
            "BEARER s3cret",
            "Bearer\ts3cret",
            "Bearer  s3cret ",
        ] {
            let h = headers(&[
                (header::HOST, "127.0.0.1:8687"),
                (header::AUTHORIZATION, auth),
            ]);
            assert!(check(&c, &h, l, Scope::Read).is_ok(), "{auth:?}");
        }
        let mut two = headers(&[
            (header::HOST, "127.0.0.1:8687"),
            (header::AUTHORIZATION, "Bearer s3cret"),
        ]);
        two.append(header::HOST, HeaderValue::from_static("evil.example"));
        assert_eq!(
            check(&c, &two, l, Scope::Read).err(),
            Some(Refusal::DuplicateHost)
        );
        let h = headers(&[
            (header::HOST, "127.0.0.1:8687"),
            (header::AUTHORIZATION, "Bearer s3cret"),
        ]);
        let absolute = RequestParts {
            headers: &h,
            authority: Some("evil.example:8687"),
            ticket: None,
        };
        assert_eq!(
            identify(&c, &FailureBudget::default(), &absolute, l).err(),
            Some(Refusal::ForeignHost)
        );
    }

    #[test]
    fn one_client_cannot_take_every_ticket() {
        let c = Clients::new(&[
            ApiClient {
                name: "greedy".into(),
                token_sha256: hex::encode(Sha256::digest(b"a")),
                scopes: vec![Scope::Read],
                origins: vec![],
            },
            ApiClient {
                name: "kiosk".into(),
                token_sha256: hex::encode(Sha256::digest(b"b")),
                scopes: vec![Scope::Read],
                origins: vec![],
            },
        ]);
        let greedy = c.configured("a").unwrap();
        for _ in 0..MAX_TICKETS_PER_CLIENT {
            assert!(c.issue_ticket(&greedy).is_ok());
        }
        assert_eq!(c.issue_ticket(&greedy), Err(TicketError::TooMany));
        // A console session of the same client shares its account's tickets.
        let session = Identity {
            name: "greedy (console)".into(),
            session: true,
            ..greedy.clone()
        };
        assert_eq!(c.issue_ticket(&session), Err(TicketError::TooMany));
        assert!(c.issue_ticket(&c.configured("b").unwrap()).is_ok());
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
        assert_eq!(local_scopes(&users, 1000, 1000, &[]), [Scope::Read]);
        assert_eq!(
            local_scopes(&users, 1000, 50, &[]),
            [Scope::Read, Scope::Sync]
        );
        assert!(local_scopes(&users, 1001, 1001, &[]).is_empty());
        assert_eq!(
            local_scopes(&users, 1001, 1001, &[4, 50]),
            [Scope::Read, Scope::Sync]
        );
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
