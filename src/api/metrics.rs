//! `GET /metrics`, on the API listener (token and Host rules as every route) and on the fleet's
//! metrics listener (`[metrics] listen`): that one serves `/metrics` and nothing else, so it may
//! listen on any address; a bearer token is asked for when `token_sha256` is set.
//!
//! Without a token, the Host header is what keeps a web page out: a page that rebinds its own
//! DNS name to the station's address sends that name as Host, so only addresses, `localhost`
//! and the names in `[metrics] hosts` are answered. With a token the page cannot authenticate,
//! so any Host is answered (Prometheus scrapes by whatever name its targets use).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::security::FailureBudget;
use super::{error, Listener, Refusals, Shared};
use crate::metrics::{Snapshot, CONTENT_TYPE};

/// What the station is now: readers and cards from the station, the outbox from the database.
pub fn snapshot(shared: &Shared) -> Snapshot {
    let (readers, cards) = shared
        .station
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .counts();
    let outbox = crate::store::blocking(|| {
        let guard = shared.store.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map(|s| s.outbox_summary())
    });
    let crate::store::revocations::OutboxSummary { counts, oldest } = match outbox {
        Some(Ok(summary)) => summary,
        Some(Err(e)) => {
            tracing::error!("metrics: cannot read the outbox: {e}");
            Default::default()
        }
        None => Default::default(),
    };
    let oldest_queued_seconds = oldest
        .and_then(|at| {
            time::OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339).ok()
        })
        .map(|at| {
            (time::OffsetDateTime::now_utc() - at)
                .as_seconds_f64()
                .max(0.0)
        });
    Snapshot {
        readers,
        cards,
        actions: counts,
        oldest_queued_seconds,
    }
}

fn exposition(shared: &Shared) -> Response {
    let text = shared.metrics.render(&snapshot(shared));
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()
}

#[utoipa::path(get, path = "/metrics", responses(Refusals, (status = 200, description = "Prometheus text exposition (0.0.4)", content_type = "text/plain")))]
pub(super) async fn metrics_text(State(l): State<Listener>) -> Response {
    exposition(&l.shared)
}

/// Who may scrape the metrics listener.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// SHA-256 of the bearer token Prometheus must send, when one is configured.
    pub token_sha256: Option<[u8; 32]>,
    /// Names accepted in Host (when there is no token) besides addresses and `localhost`.
    pub hosts: Vec<String>,
}

/// The fleet's metrics listener: `GET /metrics` only, everything else 404.
#[derive(Clone)]
struct Scrape {
    shared: Arc<Shared>,
    access: Arc<Access>,
    /// Wrong tokens allowed before the listener answers 429: guessing is slowed, while the
    /// right token is always let through. The listener's own, so guesses here do not spend
    /// the API's budget, nor the API's guesses this one.
    failures: Arc<FailureBudget>,
}

/// The router of the metrics listener bound to `addr`.
pub fn scrape_router(shared: Arc<Shared>, access: Access, addr: SocketAddr, tls: bool) -> Router {
    let scheme = if tls { "https" } else { "http" };
    tracing::info!("metrics listening on {scheme}://{addr}/metrics");
    Router::new()
        .route("/metrics", get(scrape))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "only /metrics is served here",
            )
        })
        .with_state(Scrape {
            shared,
            access: Arc::new(access),
            failures: Arc::default(),
        })
}

/// Whether a Host header value names this station as a scrape may: an IP address (a browser
/// page cannot be same-origin with it), `localhost`, or one of `names`, with any port.
pub fn host_accepted(host: &str, names: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        Some(rest) => {
            return rest
                .split_once(']')
                .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok())
        }
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

async fn scrape(State(s): State<Scrape>, headers: HeaderMap) -> Response {
    if s.access.token_sha256.is_none() {
        let mut hosts = headers.get_all(header::HOST).iter();
        let host = hosts.next().and_then(|h| h.to_str().ok());
        if hosts.next().is_some() {
            return error(
                StatusCode::BAD_REQUEST,
                "duplicate_host",
                "a request carries exactly one Host header",
            );
        }
        if !host.is_some_and(|h| host_accepted(h, &s.access.hosts)) {
            return error(
                StatusCode::MISDIRECTED_REQUEST,
                "foreign_host",
                "the Host header does not name this station; add the name to [metrics] hosts",
            );
        }
    }
    if let Some(expected) = s.access.token_sha256 {
        let presented = super::security::bearer(&headers).map(|t| Sha256::digest(t.as_bytes()));
        let ok = presented.is_some_and(|digest| bool::from(digest.as_slice().ct_eq(&expected)));
        if !ok && !s.failures.spend(Instant::now()) {
            let mut answer = error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_failures",
                "too many wrong tokens; wait and retry",
            );
            answer
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            return answer;
        }
        if !ok {
            let mut answer = error(
                StatusCode::UNAUTHORIZED,
                "bad_token",
                "a valid bearer token is required",
            );
            answer.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
            return answer;
        }
    }
    exposition(&s.shared)
}

#[cfg(test)]
mod tests {
    use super::host_accepted;

    #[test]
    fn hosts_a_scrape_may_name() {
        let names = vec!["kiosk-01.contoso.com".to_string()];
        for host in [
            "127.0.0.1:9687",
            "10.1.2.3",
            "[::1]:9687",
            "[fe80::1]",
            "localhost:9687",
            "LOCALHOST",
            "kiosk-01.contoso.com:9687",
            "Kiosk-01.Contoso.com",
        ] {
            assert!(host_accepted(host, &names), "{host}");
        }
        for host in [
            "evil.example:9687",
            "kiosk-01.contoso.com.evil.example",
            "127.0.0.1.nip.io:9687",
            "[evil]:9687",
            "",
        ] {
            assert!(!host_accepted(host, &names), "{host}");
        }
    }
}
