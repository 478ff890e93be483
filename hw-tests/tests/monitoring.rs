//! The monitoring the package ships (`service/monitoring/`): the alerting rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), and every query of the
//! rules and the Grafana dashboard parses and names only metrics cardbridge exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use cardbridge::card::{Card, ReadError};
use cardbridge::http::ServerError;
use cardbridge::metrics::{Metrics, Snapshot};
use cardbridge::reconcile::{reconcile, Lookup};
use serde_json::Value;

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../service/monitoring")
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(monitoring())
        .output()
        .expect("promtool is installed (apt-get install prometheus)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn the_alerting_rules_check_and_their_unit_tests_pass() {
    let (ok, said) = promtool(&["check", "rules", "cardbridge.rules.yml"]);
    assert!(ok && said.contains("SUCCESS: 8 rules found"), "{said}");
    let (ok, said) = promtool(&["test", "rules", "cardbridge.rules.test.yml"]);
    assert!(ok && said.contains("SUCCESS"), "{said}");
}

/// Every metric family cardbridge exports, with a histogram's series names. A family shows only
/// once it has a sample, so each is given one first.
fn exported() -> BTreeSet<String> {
    let metrics = Metrics::default();
    metrics.read(20, None);
    metrics.request("/v1/health", 200);
    metrics.refused("bad_token");
    let now = time::OffsetDateTime::now_utc();
    let card = Card::failed("r", &[0x3B, 0x00], &ReadError::Deadline, now);
    let down = Lookup::Unavailable(ServerError::Refused("refused".into()));
    metrics.reconciled(&reconcile(&card, &down, &Default::default(), now));
    let text = metrics.render(&Snapshot {
        actions: vec![("queued".into(), 1)],
        ..Snapshot::default()
    });
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("cardbridge_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

fn dashboard_queries() -> Vec<String> {
    let text =
        std::fs::read_to_string(monitoring().join("grafana-dashboard.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn every_dashboard_query_parses_and_names_exported_metrics() {
    let queries = dashboard_queries();
    assert!(queries.len() >= 8, "{queries:?}");
    // promtool parses PromQL in rule files: the queries become recording rules.
    let dir = std::env::temp_dir().join(format!("cardbridge-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, q) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query{n}\n        expr: {}\n",
            serde_json::to_string(q).expect("quoted")
        ));
    }
    let file = dir.join("dashboard.rules.yml");
    std::fs::write(&file, rules).expect("rules");
    let (ok, said) = promtool(&["check", "rules", &file.to_string_lossy()]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "{said}");

    let exported = exported();
    let rules = std::fs::read_to_string(monitoring().join("cardbridge.rules.yml")).expect("rules");
    for name in queries
        .iter()
        .flat_map(|q| metric_names(q))
        .chain(metric_names(&rules))
    {
        assert!(
            exported.contains(&name),
            "{name} is not exported; cardbridge exports {exported:?}"
        );
    }
}

#[test]
fn an_unknown_metric_name_would_be_caught() {
    assert_eq!(
        metric_names("rate(cardbridge_reads_total[5m])"),
        ["cardbridge_reads_total"]
    );
    assert!(!exported().contains("cardbridge_reads_total"));
}
