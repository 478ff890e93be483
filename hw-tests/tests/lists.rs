//! End-to-end: `$filter` on `GET /v1/cards` and `GET /v1/revocations` (the MIM REST APIs'
//! OData style), and the request limits: a request that runs past the timeout is answered 408,
//! one over the concurrency limit 503 with Retry-After.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::daemon::{read_answer, Daemon, ADMIN, TOKEN};
use common::piv_card;
use serde_json::{json, Value};

/// GET `path` with `$filter` (percent-encoded here) as the kiosk client.
fn filtered(daemon: &Daemon, path: &str, filter: &str) -> (u16, Value) {
    let encoded: String = form_urlencoded::byte_serialize(filter.as_bytes()).collect();
    let (status, text) = daemon.get(
        &format!("{path}?$filter={encoded}"),
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn count(answer: &Value) -> Option<usize> {
    answer.as_array().map(Vec::len)
}

#[test]
fn cards_are_filtered_by_their_fields_and_their_verdict() {
    let (_shared, _slot, card, card_id) = piv_card();
    let sim = common::simulator_knowing(&card.truth, false);
    let daemon = Daemon::start(
        "filter-cards",
        &format!("[cm]\nbase_url = \"{}\"\n", sim.cm_base_url()),
    );
    daemon.wait_reconciliation(&card_id, "", "matched", |r| r["verdict"] == "ok");
    // Other tests' cards may be in the other slot: every filter names this card.
    let mine = format!("card_id eq '{card_id}'");
    for (filter, expected) in [
        (format!("{mine} and kind eq 'piv'"), 1),
        (format!("{mine} and kind eq 'gids'"), 0),
        (format!("{mine} and reconciliation/verdict eq 'ok'"), 1),
        (format!("{mine} and reconciliation/verdict ne 'ok'"), 0),
        (
            format!("{mine} and read_at gt datetime'2000-01-01T00:00:00Z'"),
            1,
        ),
        (
            format!("{mine} and apdu_count ge 1 and apdu_count lt 1000"),
            1,
        ),
    ] {
        let (status, answer) = filtered(&daemon, "/v1/cards", &filter);
        assert_eq!(
            (status, count(&answer)),
            (200, Some(expected)),
            "{filter}: {answer}"
        );
    }
    let (_, answer) = filtered(&daemon, "/v1/cards", &format!("{mine} and kind eq 'piv'"));
    assert_eq!(
        answer[0]["card_id"],
        card_id.as_str(),
        "the Card object itself"
    );
}

#[test]
fn a_bad_filter_is_400_bad_filter_with_its_position() {
    let daemon = Daemon::start("filter-bad", "");
    for (path, filter, position) in [
        ("/v1/cards", "colour eq 'red'", 0),
        ("/v1/cards", "kind eq", 7),
        ("/v1/revocations", "status eq 'failed' or id eq 1", 19),
        ("/v1/revocations", "created_at ge datetime'soon'", 22),
    ] {
        let (status, answer) = filtered(&daemon, path, filter);
        assert_eq!(status, 400, "{filter}: {answer}");
        assert_eq!(answer["error"]["code"], "bad_filter", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.ends_with(&format!("at position {position}")),
            "{filter}: {message}"
        );
    }
}

#[test]
fn revocations_are_filtered_by_their_fields() {
    let (_shared, _slot, card, card_id) = piv_card();
    let sim = common::simulator_knowing(&card.truth, true);
    let config = format!(
        "[cm]\nbase_url = \"{}\"\n[scepman]\nbase_url = \"{}\"\n",
        sim.cm_base_url(),
        sim.scepman_base_url()
    );
    let daemon = Daemon::start("filter-revocations", &config);
    daemon.wait_reconciliation(&card_id, "", "matched", |r| r["state"] == "matched");
    let admin = format!("Bearer {ADMIN}");
    for (key, (reason, slot)) in [("keyCompromise", 0), ("superseded", 1)]
        .into_iter()
        .enumerate()
    {
        let body = json!({"card_id": card_id, "target": "certificates", "reason": reason,
                          "thumbprints": [card.truth.certificates[slot].thumbprint]});
        let (status, text) = daemon.request(
            "POST",
            "/v1/revocations",
            &[
                ("Authorization", &admin),
                ("Content-Type", "application/json"),
                ("Idempotency-Key", &format!("filter-{key}")),
            ],
            &body.to_string(),
        );
        assert_eq!(status, 202, "{text}");
    }
    for (filter, expected) in [
        ("reason eq 'superseded'", 1),
        ("reason eq 'keyCompromise' and target eq 'certificates'", 1),
        (
            "created_at ge datetime'2000-01-01T00:00:00Z' and client eq 'admin'",
            2,
        ),
        ("created_at lt datetime'2000-01-01T00:00:00Z'", 0),
        ("reason_code gt 1", 1),
        ("id ge 1 and id le 1", 1),
    ] {
        let (status, answer) = filtered(&daemon, "/v1/revocations", filter);
        assert_eq!(
            (status, count(&answer)),
            (200, Some(expected)),
            "{filter}: {answer}"
        );
    }
}

/// Sends the head of a POST whose body never comes: the request is open until the server ends it.
fn stalled_post(daemon: &Daemon) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", daemon.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let card = "00112233445566778899AABBCCDDEEFF";
    let head = format!(
        "POST /v1/cards/{card}/sync HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n",
        daemon.port,
        common::daemon::HELPDESK
    );
    s.write_all(head.as_bytes()).expect("send");
    s
}

#[test]
fn a_request_whose_body_does_not_come_in_time_is_408() {
    let daemon = Daemon::start_with("limits-408", "request_timeout_ms = 500\n", "");
    let started = std::time::Instant::now();
    let mut stalled = stalled_post(&daemon);
    let (status, body) = read_answer(&mut stalled);
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("request_timeout"), "{body}");
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[test]
fn a_request_over_the_concurrency_limit_is_503_with_retry_after() {
    let daemon = Daemon::start_with(
        "limits-503",
        "max_concurrent_requests = 2\nrequest_timeout_ms = 60000\n",
        "",
    );
    // Two requests hold both places while their bodies do not come, for longer than the wait
    // below may last: on a loaded machine the two could otherwise time out before it sees 503.
    let _first = stalled_post(&daemon);
    let _second = stalled_post(&daemon);
    let auth = format!("Bearer {TOKEN}");
    let (status, answer) =
        common::eventually("the limit to be reached", Duration::from_secs(30), || {
            let raw = raw_get(&daemon, "/v1/health", &auth);
            raw.starts_with("HTTP/1.1 503").then_some(raw)
        })
        .split_once("\r\n\r\n")
        .map(|(head, body)| (head.to_string(), body.to_string()))
        .unwrap_or_default();
    assert!(
        status.to_ascii_lowercase().contains("retry-after: 1"),
        "{status}"
    );
    assert!(answer.contains("\"overloaded\""), "{answer}");
    // The event stream is not counted: it still opens.
    let mut stream = TcpStream::connect(("127.0.0.1", daemon.port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let request = format!(
        "GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: {auth}\r\n\r\n",
        daemon.port
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut line).expect("answer");
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
}

/// A GET whose whole answer (head and body) is returned as text.
fn raw_get(daemon: &Daemon, path: &str, auth: &str) -> String {
    use std::io::Read;
    let mut s = TcpStream::connect(("127.0.0.1", daemon.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n",
        daemon.port
    );
    s.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}
