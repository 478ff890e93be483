//! The station's metrics, named the Prometheus way (base units, `_total` counters, `_seconds`)
//! and encoded by the `prometheus-client` crate in the Prometheus text format (0.0.4): every
//! Prometheus scrapes it, and `promtool check metrics` lints it (its OpenMetrics output names a
//! counter's family without `_total`, which promtool 2.42 refuses).
//!
//! Counters and the read histogram are updated as things happen (`daemon::apply`, the API's
//! gate). What is a state rather than an event — readers, cards, the outbox — is read at scrape
//! time and handed to [`Metrics::render`] as a [`Snapshot`], so it can never drift.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::prometheus_text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::reconcile::scepman::ScepmanState;
use crate::reconcile::{Reconciliation, State};

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the read-duration buckets: a read takes 20 ms on a fast card and
/// seconds on a slow reader.
const READ_BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerCode {
    server: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabel {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

/// What the station is, read at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub readers: usize,
    pub cards: usize,
    /// Revocation actions by status (`queued`, `sending`, `done`…).
    pub actions: Vec<(String, i64)>,
    /// How long the oldest queued action has waited, when one does.
    pub oldest_queued_seconds: Option<f64>,
}

pub struct Metrics {
    registry: Registry,
    reads: Family<ResultLabel, Counter>,
    read_seconds: Histogram,
    reconciliations: Family<VerdictLabel, Counter>,
    server_errors: Family<ServerCode, Counter>,
    server_up: Family<ServerLabel, Gauge>,
    readers: Gauge,
    cards: Gauge,
    pcscd_up: Gauge,
    actions: Family<StatusLabel, Gauge>,
    oldest_queued: Gauge<f64, AtomicU64>,
    requests: Family<RouteStatus, Counter>,
    refusals: Family<CodeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("cardbridge");
        let m = Metrics {
            reads: Family::default(),
            read_seconds: Histogram::new(READ_BUCKETS),
            reconciliations: Family::default(),
            server_errors: Family::default(),
            server_up: Family::default(),
            readers: Gauge::default(),
            cards: Gauge::default(),
            pcscd_up: Gauge::default(),
            actions: Family::default(),
            oldest_queued: Gauge::default(),
            requests: Family::default(),
            refusals: Family::default(),
            registry: Registry::default(),
        };
        m.pcscd_up.set(1);
        registry.register(
            "card_reads",
            "Card reads by result (ok or the error code)",
            m.reads.clone(),
        );
        registry.register_with_unit(
            "card_read_duration",
            "Time to read a card, from connecting to the last APDU",
            Unit::Seconds,
            m.read_seconds.clone(),
        );
        registry.register(
            "reconciliations",
            "Reconciliations by verdict",
            m.reconciliations.clone(),
        );
        registry.register(
            "server_errors",
            "Failed calls to MIM CM (cm) and SCEPman (scepman) by error code",
            m.server_errors.clone(),
        );
        registry.register(
            "server_up",
            "Whether the last call to the server got an answer (1) or failed (0)",
            m.server_up.clone(),
        );
        registry.register("readers", "Readers known to pcscd", m.readers.clone());
        registry.register("cards", "Cards in readers", m.cards.clone());
        registry.register("pcscd_up", "Whether pcscd is reachable", m.pcscd_up.clone());
        registry.register(
            "revocation_actions",
            "Revocation actions by status",
            m.actions.clone(),
        );
        registry.register_with_unit(
            "outbox_oldest_queued_age",
            "How long the oldest queued revocation action has waited (0 when none waits)",
            Unit::Seconds,
            m.oldest_queued.clone(),
        );
        registry.register(
            "http_requests",
            "Local API requests by route pattern and status",
            m.requests.clone(),
        );
        registry.register(
            "http_refusals",
            "Local API calls refused before the caller was known, by error code",
            m.refusals.clone(),
        );
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").into(),
            })
            .set(1);
        registry.register("build_info", "The running cardbridge version", build);
        Metrics { registry, ..m }
    }

    /// A card read: `failure` is the error code of a failed one.
    pub fn read(&self, read_ms: u64, failure: Option<&str>) {
        let result = failure.unwrap_or("ok").to_string();
        self.reads.get_or_create(&ResultLabel { result }).inc();
        self.read_seconds.observe(read_ms as f64 / 1000.0);
    }

    /// A reconciliation: its verdict, and what it says about each server's reachability.
    pub fn reconciled(&self, r: &Reconciliation) {
        let verdict = r.verdict.as_str().to_string();
        self.reconciliations
            .get_or_create(&VerdictLabel { verdict })
            .inc();
        match r.state {
            State::ServerUnavailable => {
                let code = r.reason.as_deref().and_then(|s| s.split(':').next());
                self.server_failed("cm", code.unwrap_or("unknown"));
            }
            State::Matched | State::NotFound => self.server_answered("cm"),
            State::NotConfigured | State::NoCardId => {}
        }
        let scepman: Vec<_> = r
            .certificates
            .iter()
            .filter_map(|c| c.scepman.as_ref())
            .collect();
        let failure = scepman
            .iter()
            .filter(|s| s.status == ScepmanState::Unknown)
            .filter_map(|s| s.reason.as_deref())
            .find(|reason| *reason != "not_listed");
        match failure {
            Some(reason) => {
                self.server_failed("scepman", reason.split(':').next().unwrap_or(reason))
            }
            None if !scepman.is_empty() => self.server_answered("scepman"),
            None => {}
        }
    }

    fn server_failed(&self, server: &str, code: &str) {
        let labels = ServerCode {
            server: server.into(),
            code: code.into(),
        };
        self.server_errors.get_or_create(&labels).inc();
        self.server_up
            .get_or_create(&ServerLabel {
                server: server.into(),
            })
            .set(0);
    }

    fn server_answered(&self, server: &str) {
        self.server_up
            .get_or_create(&ServerLabel {
                server: server.into(),
            })
            .set(1);
    }

    /// Whether pcscd is reachable, as the monitor last saw it.
    pub fn pcscd(&self, up: bool) {
        self.pcscd_up.set(i64::from(up));
    }

    /// An API request by route pattern (not path: card ids would explode the label set).
    pub fn request(&self, route: &str, status: u16) {
        let labels = RouteStatus {
            route: route.into(),
            status: status.to_string(),
        };
        self.requests.get_or_create(&labels).inc();
    }

    /// A call refused before its caller was known (401, 403, 421, 429), by error code.
    pub fn refused(&self, code: &str) {
        self.refusals
            .get_or_create(&CodeLabel { code: code.into() })
            .inc();
    }

    /// The exposition, with the station's state as of now.
    pub fn render(&self, now: &Snapshot) -> String {
        self.readers.set(now.readers as i64);
        self.cards.set(now.cards as i64);
        self.actions.clear();
        for (status, n) in &now.actions {
            self.actions
                .get_or_create(&StatusLabel {
                    status: status.clone(),
                })
                .set(*n);
        }
        self.oldest_queued
            .set(now.oldest_queued_seconds.unwrap_or(0.0));
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_names_in_base_units() {
        let m = Metrics::default();
        m.read(7, None);
        m.read(300, Some("card_removed"));
        m.request("/v1/cards/{card_id}", 200);
        m.refused("bad_token");
        m.pcscd(false);
        let text = m.render(&Snapshot {
            readers: 2,
            cards: 1,
            actions: vec![("queued".into(), 3)],
            oldest_queued_seconds: Some(42.5),
        });
        for line in [
            "cardbridge_readers 2",
            "cardbridge_cards 1",
            "cardbridge_pcscd_up 0",
            "cardbridge_card_reads_total{result=\"ok\"} 1",
            "cardbridge_card_reads_total{result=\"card_removed\"} 1",
            "cardbridge_card_read_duration_seconds_bucket{le=\"0.01\"} 1",
            "cardbridge_card_read_duration_seconds_bucket{le=\"0.5\"} 2",
            "cardbridge_card_read_duration_seconds_count 2",
            "cardbridge_revocation_actions{status=\"queued\"} 3",
            "cardbridge_outbox_oldest_queued_age_seconds 42.5",
            "cardbridge_http_requests_total{route=\"/v1/cards/{card_id}\",status=\"200\"} 1",
            "cardbridge_http_refusals_total{code=\"bad_token\"} 1",
            "cardbridge_build_info{version=\"",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn a_status_that_disappears_leaves_the_exposition() {
        let m = Metrics::default();
        m.render(&Snapshot {
            actions: vec![("queued".into(), 1)],
            ..Snapshot::default()
        });
        let text = m.render(&Snapshot::default());
        assert!(!text.contains("status=\"queued\""), "{text}");
    }
}
