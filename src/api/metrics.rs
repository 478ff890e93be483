//! `GET /metrics`, on the API listener (token and Host rules as every route) and on the fleet's
//! metrics listener (`[metrics] listen`): that one serves `/metrics` and nothing else, so it may
//! listen on any address; a bearer token is asked for when `token_sha256` is set.

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

/// The fleet's metrics listener: `GET /metrics` only, everything else 404.
#[derive(Clone)]
struct Scrape {
    shared: Arc<Shared>,
    /// SHA-256 of the bearer token Prometheus must send, when one is configured.
    token_sha256: Option<[u8; 32]>,
    /// Wrong tokens allowed before the listener answers 429: guessing is slowed, while the
    /// right token is always let through. The listener's own, so guesses here do not spend
    /// the API's budget, nor the API's guesses this one.
    failures: Arc<FailureBudget>,
}

/// The router of the metrics listener bound to `addr`.
pub fn scrape_router(
    shared: Arc<Shared>,
    token_sha256: Option<[u8; 32]>,
    addr: SocketAddr,
    tls: bool,
) -> Router {
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
            token_sha256,
            failures: Arc::default(),
        })
}

async fn scrape(State(s): State<Scrape>, headers: HeaderMap) -> Response {
    if let Some(expected) = s.token_sha256 {
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
