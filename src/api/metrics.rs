//! `GET /metrics`: Prometheus text exposition of what the station did.
//!
//! Counters live behind one mutex: they change a few times per card and per API request, far
//! below where contention would matter, and one lock keeps the exposition consistent.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (ms) of the read-latency histogram buckets.
const READ_BUCKETS: [u64; 10] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 10000];

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    reads: u64,
    read_failures: BTreeMap<String, u64>,
    read_buckets: [u64; READ_BUCKETS.len()],
    read_ms_sum: u64,
    reconciliations: BTreeMap<String, u64>,
    server_errors: BTreeMap<String, u64>,
    requests: BTreeMap<(String, u16), u64>,
    refusals: BTreeMap<&'static str, u64>,
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A card read: `failure` is the error code of a failed one.
    pub fn read(&self, read_ms: u64, failure: Option<&str>) {
        self.with(|m| {
            m.reads += 1;
            m.read_ms_sum += read_ms;
            for (bucket, bound) in m.read_buckets.iter_mut().zip(READ_BUCKETS) {
                if read_ms <= bound {
                    *bucket += 1;
                }
            }
            if let Some(code) = failure {
                *m.read_failures.entry(code.to_string()).or_default() += 1;
            }
        });
    }

    /// A reconciliation with its verdict, and the server error code when it could not ask.
    pub fn reconciled(&self, verdict: &str, server_error: Option<&str>) {
        self.with(|m| {
            *m.reconciliations.entry(verdict.to_string()).or_default() += 1;
            if let Some(code) = server_error {
                *m.server_errors.entry(code.to_string()).or_default() += 1;
            }
        });
    }

    /// An API request by route pattern (not path: card ids would explode the label set).
    pub fn request(&self, route: &str, status: u16) {
        self.with(|m| *m.requests.entry((route.to_string(), status)).or_default() += 1);
    }

    /// A call refused before its caller was known (401, 403, 421, 429), by error code.
    pub fn refused(&self, code: &'static str) {
        self.with(|m| *m.refusals.entry(code).or_default() += 1);
    }

    /// The exposition, with the current reader and card counts.
    pub fn render(&self, readers: usize, cards: usize) -> String {
        self.with(|m| {
            let mut out = String::new();
            let _ = writeln!(out, "# HELP cardbridge_readers Readers known to pcscd.\n# TYPE cardbridge_readers gauge\ncardbridge_readers {readers}");
            let _ = writeln!(out, "# HELP cardbridge_cards Cards in readers.\n# TYPE cardbridge_cards gauge\ncardbridge_cards {cards}");
            let _ = writeln!(out, "# HELP cardbridge_reads_total Card reads.\n# TYPE cardbridge_reads_total counter\ncardbridge_reads_total {}", m.reads);
            let _ = writeln!(out, "# HELP cardbridge_read_failures_total Failed card reads by reason.\n# TYPE cardbridge_read_failures_total counter");
            for (reason, n) in &m.read_failures {
                let _ = writeln!(out, "cardbridge_read_failures_total{{reason=\"{reason}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP cardbridge_read_duration_ms Card read time.\n# TYPE cardbridge_read_duration_ms histogram");
            for (bound, n) in READ_BUCKETS.iter().zip(m.read_buckets) {
                let _ = writeln!(out, "cardbridge_read_duration_ms_bucket{{le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(out, "cardbridge_read_duration_ms_bucket{{le=\"+Inf\"}} {}", m.reads);
            let _ = writeln!(out, "cardbridge_read_duration_ms_sum {}\ncardbridge_read_duration_ms_count {}", m.read_ms_sum, m.reads);
            let _ = writeln!(out, "# HELP cardbridge_reconciliations_total Reconciliations by verdict.\n# TYPE cardbridge_reconciliations_total counter");
            for (verdict, n) in &m.reconciliations {
                let _ = writeln!(out, "cardbridge_reconciliations_total{{verdict=\"{verdict}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP cardbridge_server_errors_total CM calls that failed, by error.\n# TYPE cardbridge_server_errors_total counter");
            for (code, n) in &m.server_errors {
                let _ = writeln!(out, "cardbridge_server_errors_total{{error=\"{code}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP cardbridge_api_requests_total API requests by route and status.\n# TYPE cardbridge_api_requests_total counter");
            for ((route, status), n) in &m.requests {
                let _ = writeln!(out, "cardbridge_api_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
            }
            let _ = writeln!(out, "# HELP cardbridge_api_refusals_total API calls refused before the caller was known, by code.\n# TYPE cardbridge_api_refusals_total counter");
            for (code, n) in &m.refusals {
                let _ = writeln!(out, "cardbridge_api_refusals_total{{code=\"{code}\"}} {n}");
            }
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.read(7, None);
        m.read(300, Some("card_removed"));
        m.reconciled("ok", None);
        m.reconciled("unknown", Some("timeout"));
        m.request("/v1/cards/{card_id}", 200);
        m.refused("bad_token");
        let text = m.render(2, 1);
        for line in [
            "cardbridge_readers 2",
            "cardbridge_reads_total 2",
            "cardbridge_read_failures_total{reason=\"card_removed\"} 1",
            "cardbridge_read_duration_ms_bucket{le=\"10\"} 1",
            "cardbridge_read_duration_ms_bucket{le=\"500\"} 2",
            "cardbridge_read_duration_ms_bucket{le=\"+Inf\"} 2",
            "cardbridge_read_duration_ms_sum 307",
            "cardbridge_reconciliations_total{verdict=\"unknown\"} 1",
            "cardbridge_server_errors_total{error=\"timeout\"} 1",
            "cardbridge_api_requests_total{route=\"/v1/cards/{card_id}\",status=\"200\"} 1",
            "cardbridge_api_refusals_total{code=\"bad_token\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
