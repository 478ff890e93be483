//! End-to-end: revocations through `cardbridge run`, a virtual card in real pcscd, and the
//! SCEPman / MIM CM simulator, including kill -9 of the daemon at each step of a delivery.

mod common;

use std::time::Duration;

use common::daemon::{next_event, Daemon, ADMIN, TOKEN};
use common::{eventually, piv_card, run_cardbridge};
use hw_tests::sim::{
    matching_record, scepman_certs, without_sign_bytes, Fault, Fixture, Logged, ScepmanCert,
    SimCard, Simulator,
};
use serde_json::{json, Value};

/// Fast pacing, so retries and request polling happen within a test's patience.
fn servers(sim_cm: &str, sim_scepman: &str) -> String {
    format!(
        "[cm]\nbase_url = \"{sim_cm}\"\ntimeout_ms = 2000\n\
         [scepman]\nbase_url = \"{sim_scepman}\"\ntimeout_ms = 2000\n\
         [revocation]\nretry_initial_ms = 200\nretry_max_ms = 1000\npoll_interval_ms = 200\n"
    )
}

/// POST /v1/revocations as the admin client.
fn submit(daemon: &Daemon, key: &str, body: &Value) -> (u16, Value) {
    let auth = format!("Bearer {ADMIN}");
    let (status, text) = daemon.request(
        "POST",
        "/v1/revocations",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Idempotency-Key", key),
        ],
        &body.to_string(),
    );
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn revocation(daemon: &Daemon, id: i64) -> Value {
    let auth = format!("Bearer {TOKEN}");
    let (status, text) = daemon.get(
        &format!("/v1/revocations/{id}"),
        &[("Authorization", &auth)],
    );
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).expect("JSON")
}

/// Waits until the revocation's status is `status` (panics with the last state after 15 s).
fn wait_status(daemon: &Daemon, id: i64, status: &str) -> Value {
    eventually(
        &format!("revocation {id} {status}"),
        Duration::from_secs(15),
        || Some(revocation(daemon, id)).filter(|r| r["status"] == status),
    )
}

/// Waits until the daemon has read (and, with CM, reconciled) the card.
fn wait_card(daemon: &Daemon, card_id: &str, reconciled: bool) {
    let auth = format!("Bearer {TOKEN}");
    let path = if reconciled {
        format!("/v1/cards/{card_id}/reconciliation")
    } else {
        format!("/v1/cards/{card_id}")
    };
    eventually(&path, Duration::from_secs(15), || {
        let (status, body) = daemon.get(&path, &[("Authorization", &auth)]);
        (status == 200 && (!reconciled || body.contains("\"state\":\"matched\""))).then_some(())
    })
}

/// The MIM CM / SCEPman simulator on a free port with these records.
fn simulator(smartcards: Vec<SimCard>, scepman: Vec<ScepmanCert>) -> Simulator {
    Simulator::start(
        Fixture {
            smartcards,
            scepman,
            ..Fixture::default()
        },
        0,
    )
    .expect("simulator")
}

fn patches(log: &[Logged]) -> Vec<&Logged> {
    log.iter().filter(|l| l.method == "PATCH").collect()
}

fn posts_of_requests(log: &[Logged]) -> usize {
    log.iter()
        .filter(|l| l.method == "POST" && l.route == "requests")
        .count()
}

/// A PIV card with four certificates, read and matched: SCEPman knows three of them, the third
/// already revoked; the fourth is unknown to it.
struct FourCertificates {
    _shared: std::sync::RwLockReadGuard<'static, ()>,
    _slot: hw_tests::rig::Slot,
    card: hw_tests::vpcd::Inserted,
    card_id: String,
    known: Vec<ScepmanCert>,
    unknown: ScepmanCert,
    sim: Simulator,
    daemon: Daemon,
}

impl FourCertificates {
    fn start(name: &str) -> FourCertificates {
        let (_shared, _slot, card, card_id) = piv_card();
        let mut known = scepman_certs(&card.truth);
        assert_eq!(known.len(), 4);
        let unknown = known.pop().expect("fourth certificate");
        known[2].revocation_date = Some("2026-01-01T00:00:00Z".into());
        let sim = simulator(vec![matching_record(&card.truth, false)], known.clone());
        let daemon = Daemon::start(name, &servers(&sim.cm_base_url(), &sim.scepman_base_url()));
        wait_card(&daemon, &card_id, true);
        FourCertificates {
            _shared,
            _slot,
            card,
            card_id,
            known,
            unknown,
            sim,
            daemon,
        }
    }

    /// The helpdesk's request: every certificate on the card, key compromise.
    fn all_certificates(&self) -> Value {
        json!({"card_id": self.card_id, "target": "certificates", "reason": "keyCompromise",
               "revoker": "helpdesk@contoso.com", "comment": "reported lost"})
    }
}

#[test]
fn a_request_without_key_scope_or_json_is_refused() {
    let t = FourCertificates::start("revoke-headers");
    let body = t.all_certificates().to_string();
    let admin = format!("Bearer {ADMIN}");
    let kiosk = format!("Bearer {TOKEN}");
    let json_type = ("Content-Type", "application/json");
    let key = ("Idempotency-Key", "k");
    let cases = [
        (
            vec![("Authorization", admin.as_str()), json_type],
            400,
            "missing_idempotency_key",
        ),
        (
            vec![("Authorization", kiosk.as_str()), json_type, key],
            403,
            "missing_scope",
        ),
        (
            vec![
                ("Authorization", admin.as_str()),
                ("Content-Type", "text/plain"),
                key,
            ],
            415,
            "unsupported_media_type",
        ),
    ];
    for (headers, status, code) in cases {
        let (got, text) = t.daemon.request("POST", "/v1/revocations", &headers, &body);
        let answer: Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{text}"
        );
    }
    assert!(patches(&t.sim.log()).is_empty());
}

#[test]
fn a_bad_body_is_refused_with_its_code_and_nothing_is_sent() {
    let t = FourCertificates::start("revoke-refusals");
    let card_id = &t.card_id;
    let refusals = [
        (
            json!({"card_id": card_id, "target": "certificates", "reason": "stolen"}),
            400,
            "bad_reason",
        ),
        (
            json!({"card_id": card_id, "target": "everything", "reason": "superseded"}),
            400,
            "bad_body",
        ),
        (
            json!({"card_id": card_id, "target": "certificates", "reason": "superseded", "extra": 1}),
            400,
            "bad_body",
        ),
        (
            json!({"card_id": "00112233445566778899AABBCCDDEEFF", "target": "certificates", "reason": "superseded"}),
            404,
            "unknown_card",
        ),
        (
            json!({"card_id": card_id, "target": "certificates", "reason": "superseded", "thumbprints": ["AB".repeat(20)]}),
            422,
            "certificate_not_on_card",
        ),
        (
            json!({"card_id": card_id, "target": "card", "operation": "retire", "reason": "superseded", "thumbprints": []}),
            422,
            "bad_combination",
        ),
    ];
    for (i, (body, status, code)) in refusals.iter().enumerate() {
        let (got, answer) = submit(&t.daemon, &format!("refused-{i}"), body);
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (*status, Some(*code)),
            "{body}: {answer}"
        );
    }
    assert!(patches(&t.sim.log()).is_empty());
    let (status, list) = list(&t.daemon, "");
    assert_eq!(
        (status, list.as_array().map(Vec::len)),
        (200, Some(0)),
        "{list}"
    );
}

#[test]
fn a_dry_run_plans_every_certificate_and_sends_nothing() {
    let t = FourCertificates::start("revoke-dry");
    let mut body = t.all_certificates();
    body["dry_run"] = json!(true);
    let (status, plan) = submit(&t.daemon, "dry", &body);
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["plan"]["actions"].as_array().map(Vec::len), Some(4));
    assert!(patches(&t.sim.log()).is_empty());
}

#[test]
fn certificates_are_revoked_once_each_with_every_answer_kept() {
    let t = FourCertificates::start("revoke-certs");
    let mut events = t.daemon.events(None);
    let (status, stored) = submit(&t.daemon, "lost-card-1", &t.all_certificates());
    assert_eq!(status, 202, "{stored}");
    let id = stored["id"].as_i64().expect("id");
    assert_eq!(stored["actions"].as_array().map(Vec::len), Some(4));
    let done = wait_status(&t.daemon, id, "partially_failed");
    let by_serial = |serial: &str| {
        done["actions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["serial_number"] == serial)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(by_serial(&t.known[0].serial_number)["status"], "done");
    assert_eq!(by_serial(&t.known[1].serial_number)["status"], "done");
    assert_eq!(
        by_serial(&t.known[2].serial_number)["status"],
        "already_revoked"
    );
    let failed = by_serial(&t.unknown.serial_number);
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["last_outcome"]["server_error_code"], 7012);
    let attempts = done["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 4, "{attempts:?}");
    assert!(attempts
        .iter()
        .any(|a| a["server_error_code"] == 5013 && a["http_status"] == 409));

    // SCEPman got exactly one PATCH per serial, with the reason number and the revoker.
    let log = t.sim.log();
    let sent = patches(&log);
    assert_eq!(sent.len(), 4, "{sent:?}");
    for cert in t.known.iter().chain([&t.unknown]) {
        let mine: Vec<&&Logged> = sent
            .iter()
            // Revoked by the integer's canonical hex, without the sign byte.
            .filter(|l| l.path.ends_with(cert.serial_number.trim_start_matches('0')))
            .collect();
        assert_eq!(mine.len(), 1, "{}", cert.serial_number);
        let body: Value = serde_json::from_str(&mine[0].body).expect("JSON body");
        assert_eq!(
            body,
            json!({"revocationReason": 1, "revoker": "helpdesk@contoso.com"})
        );
    }
    assert_eq!(t.sim.scepman()[0].revocation_reason, Some(1));

    let (_, _, data) = next_event(&mut events, |n, d| {
        n == "revocation.updated" && d.contains("partially_failed")
    });
    assert!(data.contains(&format!("\"id\":{id}")), "{data}");
}

#[test]
fn the_same_idempotency_key_returns_the_same_revocation_and_another_body_conflicts() {
    let t = FourCertificates::start("revoke-idempotent");
    let body = t.all_certificates();
    let (status, stored) = submit(&t.daemon, "lost-card-1", &body);
    assert_eq!(status, 202, "{stored}");
    let id = stored["id"].as_i64().expect("id");
    wait_status(&t.daemon, id, "partially_failed");

    let (status, again) = submit(&t.daemon, "lost-card-1", &body);
    assert_eq!((status, again["id"].as_i64()), (202, Some(id)), "{again}");
    let mut other = body.clone();
    other["reason"] = json!("superseded");
    let (status, answer) = submit(&t.daemon, "lost-card-1", &other);
    assert_eq!(status, 409, "{answer}");
    assert_eq!(patches(&t.sim.log()).len(), 4, "nothing is sent again");
}

#[test]
fn the_command_line_submits_and_lists_revocations() {
    let t = FourCertificates::start("revoke-cli");
    let url = format!("http://127.0.0.1:{}", t.daemon.port);
    let token_file = t.daemon.dir.join("admin-token");
    std::fs::write(&token_file, ADMIN).expect("token file");
    let token = token_file.to_string_lossy().into_owned();
    let thumbprint = &t.card.truth.certificates[0].thumbprint;
    let revoke = [
        "revoke",
        "--card",
        &t.card_id,
        "--target",
        "certificates",
        "--reason",
        "superseded",
        "--thumbprint",
        thumbprint,
        "--url",
        &url,
        "--token-file",
        &token,
    ];
    let submitted = cli_json(&revoke);
    let id = submitted["id"].as_i64().expect("id");
    let r = wait_status(&t.daemon, id, "succeeded");
    assert_eq!(r["actions"][0]["status"], "done", "{r:#}");

    let listed = cli_json(&[
        "revocations",
        "--json",
        "--url",
        &url,
        "--token-file",
        &token,
    ]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["id"].as_i64(), Some(id));
    assert_eq!(listed[0]["attempts"].as_array().map(Vec::len), Some(1));
    assert_eq!(patches(&t.sim.log()).len(), 1);
}

#[test]
fn the_list_filters_by_status_and_refuses_an_unknown_one() {
    let t = FourCertificates::start("revoke-list");
    let (status, stored) = submit(&t.daemon, "lost-card-1", &t.all_certificates());
    assert_eq!(status, 202, "{stored}");
    wait_status(
        &t.daemon,
        stored["id"].as_i64().expect("id"),
        "partially_failed",
    );
    for (query, count) in [("?status=partially_failed", 1), ("?status=succeeded", 0)] {
        let (status, list) = list(&t.daemon, query);
        assert_eq!(
            (status, list.as_array().map(Vec::len)),
            (200, Some(count)),
            "{query}: {list}"
        );
    }
    let (status, _) = list(&t.daemon, "?status=lost");
    assert_eq!(status, 400);
}

/// GET /v1/revocations with `query`, as the kiosk client.
fn list(daemon: &Daemon, query: &str) -> (u16, Value) {
    let kiosk = format!("Bearer {TOKEN}");
    let (status, text) = daemon.get(
        &format!("/v1/revocations{query}"),
        &[("Authorization", &kiosk)],
    );
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Runs `cardbridge args` and parses what it printed as JSON; panics with stderr on failure.
fn cli_json(args: &[&str]) -> Value {
    let out = run_cardbridge(args, &[], Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn a_revocation_waits_for_the_server_and_survives_a_kill() {
    let (_shared, _slot, card, card_id) = piv_card();
    // SCEPman is down: nothing listens on its port yet.
    let port = hw_tests::rig::free_port().expect("free port");
    let down = format!("http://127.0.0.1:{port}/");
    let cm = simulator(vec![matching_record(&card.truth, false)], Vec::new());
    let mut daemon = Daemon::start("revoke-down", &servers(&cm.cm_base_url(), &down));
    wait_card(&daemon, &card_id, false);
    let thumbprint = &card.truth.certificates[1].thumbprint;
    let (status, stored) = submit(
        &daemon,
        "down-1",
        &json!({"card_id": card_id, "target": "certificates", "reason": "cessationOfOperation",
                "thumbprints": [thumbprint]}),
    );
    assert_eq!(status, 202, "{stored}");
    let id = stored["id"].as_i64().expect("id");
    // Tried, refused by the network, still queued.
    let queued = eventually("two attempts", Duration::from_secs(10), || {
        Some(revocation(&daemon, id)).filter(|r| r["actions"][0]["attempts"].as_i64() >= Some(2))
    });
    assert_eq!(queued["status"], "queued", "{queued:#}");
    assert_eq!(
        queued["actions"][0]["last_outcome"]["code"],
        "connection_refused"
    );

    // A crash while queued, then the server comes back, then the daemon: delivered, once.
    daemon.kill9();
    let truth = card.truth.clone();
    card.remove();
    let scepman = Simulator::start(
        Fixture {
            scepman: scepman_certs(&truth),
            ..Fixture::default()
        },
        port,
    )
    .expect("SCEPman on its port");
    daemon.restart();
    let done = wait_status(&daemon, id, "succeeded");
    assert_eq!(done["actions"][0]["status"], "done", "{done:#}");
    let log = scepman.log();
    assert_eq!(patches(&log).len(), 1, "{log:?}");
    assert!(patches(&log)[0].body.contains("\"revocationReason\":5"));
}

/// Starts a daemon with CM and SCEPman on `sim`, a card read and reconciled, and submits a
/// `target: card` revocation; returns the daemon and the revocation id.
fn card_revocation(name: &str, sim: &Simulator, card_id: &str, operation: &str) -> (Daemon, i64) {
    let daemon = Daemon::start(name, &servers(&sim.cm_base_url(), &sim.scepman_base_url()));
    wait_card(&daemon, card_id, true);
    let (status, stored) = submit(
        &daemon,
        &format!("{name}-1"),
        &json!({"card_id": card_id, "target": "card", "operation": operation,
                "reason": "keyCompromise", "comment": "stolen"}),
    );
    assert_eq!(status, 202, "{stored}");
    (daemon, stored["id"].as_i64().expect("id"))
}

fn wait_requests(sim: &Simulator, n: usize) {
    eventually("a CM request created", Duration::from_secs(10), || {
        (sim.requests().len() >= n).then_some(())
    })
}

#[test]
fn a_card_is_retired_through_one_cm_request_followed_to_its_end() {
    let (_shared, _slot, card, card_id) = piv_card();
    let mut record = matching_record(&card.truth, false);
    let uuid = record.smartcard["Uuid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    record.operations = vec!["retire".into()];
    let sim = simulator(vec![record], Vec::new());
    let (daemon, id) = card_revocation("revoke-retire", &sim, &card_id, "retire");
    wait_requests(&sim, 1);
    let request = sim.requests()[0].clone();
    assert_eq!(request["RequestType"], 9, "Retire: {request}");
    assert_eq!(request["OldSmartcardUuid"], uuid.as_str());
    assert!(request["Comment"]
        .as_str()
        .unwrap_or_default()
        .starts_with("keyCompromise: stolen [cardbridge:"));
    // In progress from the moment the action is marked sending; the request's URI is
    // recorded once the server's answer is in.
    let r = eventually("the request URI recorded", Duration::from_secs(15), || {
        Some(wait_status(&daemon, id, "in_progress"))
            .filter(|r| r["actions"][0]["request_uri"].is_string())
    });
    let action = &r["actions"][0];
    assert_eq!(action["status"], "sending", "{r:#}");
    assert!(action["request_uri"]
        .as_str()
        .is_some_and(|u| u.starts_with("api/v1.0/requests/")));
    // The server's workflow completes it.
    sim.set_request_status(request["Uuid"].as_str().unwrap_or_default(), 8);
    let done = wait_status(&daemon, id, "succeeded");
    assert_eq!(
        done["actions"][0]["request_status"], "Completed",
        "{done:#}"
    );
    assert_eq!(posts_of_requests(&sim.log()), 1);

    // Not allowed by CM (only retire is), not configured: refused before anything is stored.
    let (status, answer) = submit(
        &daemon,
        "revoke-op",
        &json!({"card_id": card_id, "target": "card", "operation": "revoke", "reason": "superseded"}),
    );
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (422, Some("operation_not_allowed")),
        "{answer}"
    );
    drop(daemon);
    let no_cm = Daemon::start("revoke-no-cm", "");
    wait_card(&no_cm, &card_id, false);
    let (status, answer) = submit(
        &no_cm,
        "no-cm",
        &json!({"card_id": card_id, "target": "certificates", "reason": "superseded"}),
    );
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (422, Some("server_not_configured")),
        "{answer}"
    );
    card.remove();
}

#[test]
fn a_denied_cm_request_fails_the_revocation() {
    let (_shared, _slot, card, card_id) = piv_card();
    let sim = simulator(vec![matching_record(&card.truth, false)], Vec::new());
    let (daemon, id) = card_revocation("revoke-denied", &sim, &card_id, "revoke");
    wait_requests(&sim, 1);
    let request = sim.requests()[0].clone();
    assert_eq!(request["RequestType"], 3, "Revoke: {request}");
    sim.set_request_status(request["Uuid"].as_str().unwrap_or_default(), 4);
    let failed = wait_status(&daemon, id, "failed");
    assert_eq!(
        failed["actions"][0]["request_status"], "Denied",
        "{failed:#}"
    );
    card.remove();
}

/// kill -9 while the CM server carries out the request but before its answer arrives (the
/// answer is slow), and kill -9 while the request is on its way (the server is slow to start
/// it): after a restart there is exactly one request on the server, followed to its end.
#[test]
fn a_kill_during_a_cm_request_neither_loses_nor_repeats_it() {
    let (_shared, _slot, card, card_id) = piv_card();
    for (name, fault) in [
        (
            "revoke-kill-answer",
            Fault {
                answer_delay_ms: 5_000,
                ..Fault::default()
            },
        ),
        (
            "revoke-kill-sending",
            Fault {
                latency_ms: 1_000,
                ..Fault::default()
            },
        ),
    ] {
        let sim = simulator(vec![matching_record(&card.truth, false)], Vec::new());
        sim.set_fault("requests", fault);
        let (mut daemon, id) = card_revocation(name, &sim, &card_id, "revoke");
        eventually(
            &format!("{name}: the request sent"),
            Duration::from_secs(10),
            || (posts_of_requests(&sim.log()) > 0).then_some(()),
        );
        daemon.kill9();
        let r = {
            let store = cardbridge::store::Store::open(&daemon.dir.join("state")).expect("state");
            store.revocation(id, false).expect("read").expect("stored")
        };
        assert_eq!(
            r.actions[0].status,
            cardbridge::revoke::ActionStatus::Sending,
            "{name}"
        );
        assert_eq!(r.actions[0].request_uri, None, "{name}");
        sim.set_fault("requests", Fault::default());
        daemon.restart();
        let uri = eventually(
            &format!("{name}: found or sent"),
            Duration::from_secs(15),
            || {
                revocation(&daemon, id)["actions"][0]["request_uri"]
                    .as_str()
                    .map(str::to_string)
            },
        );
        assert_eq!(sim.requests().len(), 1, "{name}: {:?}", sim.requests());
        let uuid = sim.requests()[0]["Uuid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(uri.ends_with(&uuid), "{name}: {uri} vs {uuid}");
        sim.set_request_status(&uuid, 8);
        wait_status(&daemon, id, "succeeded");
        assert_eq!(sim.requests().len(), 1, "{name}");
    }
    card.remove();
}

/// One card read and reconciled by a daemon whose SCEPman answers every revocation with
/// `fault`, and a revocation of the card's first certificate submitted to it.
struct FaultedRevocation {
    _shared: std::sync::RwLockReadGuard<'static, ()>,
    _slot: hw_tests::rig::Slot,
    card: hw_tests::vpcd::Inserted,
    sim: Simulator,
    daemon: Daemon,
    id: i64,
}

fn revoke_against(name: &str, fault: Fault) -> FaultedRevocation {
    let (shared, slot, card, card_id) = piv_card();
    let sim = simulator(
        vec![matching_record(&card.truth, false)],
        scepman_certs(&card.truth),
    );
    sim.set_fault("revoke", fault);
    let daemon = Daemon::start(name, &servers(&sim.cm_base_url(), &sim.scepman_base_url()));
    wait_card(&daemon, &card_id, true);
    let thumbprint = &card.truth.certificates[0].thumbprint;
    let (status, stored) = submit(
        &daemon,
        &format!("{name}-1"),
        &json!({"card_id": card_id, "target": "certificates", "reason": "superseded",
                "thumbprints": [thumbprint]}),
    );
    assert_eq!(status, 202, "{stored}");
    let id = stored["id"].as_i64().expect("id");
    FaultedRevocation {
        _shared: shared,
        _slot: slot,
        card,
        sim,
        daemon,
        id,
    }
}

#[test]
fn a_conflict_other_than_already_revoked_fails_and_keeps_the_answer() {
    let r = revoke_against(
        "revoke-409",
        Fault {
            conflict_code: Some(4711),
            ..Fault::default()
        },
    );
    let failed = wait_status(&r.daemon, r.id, "failed");
    let action = &failed["actions"][0];
    assert_eq!(action["status"], "failed", "{failed:#}");
    assert_eq!(action["last_outcome"]["http_status"], 409, "{failed:#}");
    assert_eq!(
        action["last_outcome"]["server_error_code"], 4711,
        "{failed:#}"
    );
    assert_ne!(action["last_outcome"]["code"], "already_revoked");
}

/// SCEPman answers a revocation 200 with no body. A 200 with a page that is not SCEPman's (the
/// simulator's `garbage`: HTML, nothing revoked) is no proof: the action stays queued and is
/// sent again, and the revocation succeeds once the real answer comes. Found by the chaos run,
/// where such an answer was taken as a revocation that never happened.
#[test]
fn a_success_page_that_is_not_scepmans_is_not_taken_as_a_revocation() {
    let r = revoke_against(
        "revoke-garbage",
        Fault {
            garbage: true,
            ..Fault::default()
        },
    );
    let queued = eventually("a bad_body attempt", Duration::from_secs(15), || {
        Some(revocation(&r.daemon, r.id))
            .filter(|v| v["actions"][0]["last_outcome"]["code"] == "bad_body")
    });
    assert_eq!(queued["status"], "queued", "{queued:#}");
    assert_eq!(queued["actions"][0]["status"], "queued", "{queued:#}");
    assert!(r.sim.revocations_carried_out().is_empty());
    r.sim.set_fault("revoke", Fault::default());
    let done = wait_status(&r.daemon, r.id, "succeeded");
    assert_eq!(done["actions"][0]["status"], "done", "{done:#}");
    let serial = &scepman_certs(&r.card.truth)[0].serial_number;
    assert_eq!(r.sim.revocations_carried_out(), vec![serial.clone()]);
}

#[test]
fn revocations_are_rate_limited_per_client_its_console_sessions_included() {
    let (_shared, _slot, card, card_id) = piv_card();
    let sim = simulator(
        vec![matching_record(&card.truth, false)],
        scepman_certs(&card.truth),
    );
    let daemon = Daemon::start_with(
        "revoke-pace",
        "revocation_burst = 2\nrevocations_per_minute = 1\n",
        &servers(&sim.cm_base_url(), &sim.scepman_base_url()),
    );
    wait_card(&daemon, &card_id, true);
    let thumbprint = &card.truth.certificates[0].thumbprint;
    let body = json!({"card_id": card_id, "target": "certificates", "reason": "superseded",
                      "thumbprints": [thumbprint]});
    let statuses: Vec<u16> = (0..3)
        .map(|n| submit(&daemon, &format!("pace-{n}"), &body).0)
        .collect();
    assert_eq!(statuses, [202, 202, 429]);
    let admin = format!("Bearer {ADMIN}");
    let answer = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", daemon.port)).expect("connect");
        let text = body.to_string();
        write!(
            s,
            "POST /v1/revocations HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: {admin}\r\nContent-Type: application/json\r\nIdempotency-Key: pace-3\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            daemon.port,
            text.len()
        )
        .expect("send");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("answer");
        answer.to_ascii_lowercase()
    };
    assert!(answer.starts_with("http/1.1 429"), "{answer}");
    assert!(answer.contains("retry-after: "), "{answer}");
    assert!(answer.contains("too_many_revocations"), "{answer}");

    // A console session of the admin spends the admin's budget: no fresh burst.
    let own = format!("http://127.0.0.1:{}", daemon.port);
    let (status, text) = daemon.request(
        "POST",
        "/v1/console/session",
        &[("Origin", &own), ("Content-Type", "application/json")],
        &json!({"token": ADMIN}).to_string(),
    );
    assert_eq!(status, 201, "{text}");
    let session: Value = serde_json::from_str(&text).expect("session JSON");
    let session_auth = format!("Bearer {}", session["token"].as_str().unwrap_or_default());
    let (status, text) = daemon.request(
        "POST",
        "/v1/revocations",
        &[
            ("Authorization", &session_auth),
            ("Origin", &own),
            ("Content-Type", "application/json"),
            ("Idempotency-Key", "pace-session"),
        ],
        &body.to_string(),
    );
    assert_eq!(status, 429, "{text}");
}

#[test]
fn the_card_is_reconciled_again_after_its_revocation_ends() {
    reconciled_again_after_revocation(true);
}

/// The same, with a SCEPman that lists serials without their DER sign byte: cardbridge finds
/// them by integer, revokes them and sees them revoked.
#[test]
fn the_card_is_reconciled_again_after_its_revocation_with_serials_listed_without_sign_bytes() {
    reconciled_again_after_revocation(false);
}

fn reconciled_again_after_revocation(sign_bytes: bool) {
    let (_shared, _slot, card, card_id) = piv_card();
    let mut listed = scepman_certs(&card.truth);
    if !sign_bytes {
        listed = without_sign_bytes(listed);
    }
    assert!(listed
        .iter()
        .all(|c| c.serial_number.starts_with("00") == sign_bytes));
    let sim = simulator(vec![matching_record(&card.truth, false)], listed);
    let daemon = Daemon::start(
        if sign_bytes {
            "revoke-reconcile"
        } else {
            "revoke-reconcile-unsigned"
        },
        &servers(&sim.cm_base_url(), &sim.scepman_base_url()),
    );
    wait_card(&daemon, &card_id, true);
    let mut events = daemon.events(None);
    let body = json!({"card_id": card_id, "target": "certificates", "reason": "keyCompromise"});
    let (status, stored) = submit(&daemon, "reconcile-after", &body);
    assert_eq!(status, 202, "{stored}");
    let id = stored["id"].as_i64().expect("id");
    next_event(&mut events, |n, d| {
        n == "revocation.updated" && d.contains(&format!("\"id\":{id}")) && d.contains("succeeded")
    });
    // The next reconciliation of the card, after the revocation's end, shows it.
    let (_, _, data) = next_event(&mut events, |n, d| {
        n == "card.reconciled" && d.contains(&card_id)
    });
    let r: Value = serde_json::from_str(&data).expect("JSON");
    assert_eq!(r["verdict"], "critical", "{r:#}");
    let statuses: Vec<&str> = r["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["on_card"] == true)
        .map(|c| c["scepman"]["status"].as_str().unwrap_or("missing"))
        .collect();
    assert_eq!(statuses, ["revoked"; 4], "{r:#}");
    assert_eq!(sim.revocations_carried_out().len(), 4);
}

/// A list answer: status, the `Link` header's target for `rel="next"` if any, and the body.
fn list_page(daemon: &Daemon, target: &str) -> (u16, Option<String>, Value) {
    let kiosk = format!("Bearer {TOKEN}");
    let answer =
        common::daemon::http_raw(daemon.port, "GET", target, &[("Authorization", &kiosk)], "");
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let next = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("link:")
                .then(|| l[5..].trim().to_string())
        })
        .and_then(|l| {
            Some(
                l.strip_prefix('<')?
                    .split_once(">; rel=\"next\"")?
                    .0
                    .to_string(),
            )
        });
    let body = serde_json::from_str(body).unwrap_or(Value::String(body.to_string()));
    (status, next, body)
}

fn ids(list: &Value) -> Vec<i64> {
    list.as_array()
        .map(|a| a.iter().filter_map(|r| r["id"].as_i64()).collect())
        .unwrap_or_default()
}

/// `$filter` searches the whole trail, not only its newest 500 entries, and a long list comes in
/// pages joined by `Link: <…>; rel="next"`. The trail is 1,200 revocations written through the
/// daemon's own store code while it runs.
#[test]
fn the_filter_searches_the_whole_trail_and_long_lists_come_in_pages() {
    use cardbridge::revoke::{Plan, Target};
    let daemon = Daemon::start("revocations-trail", "");
    let store = cardbridge::store::Store::open(&daemon.dir.join("state")).expect("the state");
    for n in 1..=1200 {
        let plan = Plan {
            card_id: format!("{:032X}", n % 7),
            target: Target::Certificates,
            reason: "superseded",
            reason_code: 4,
            operation: None,
            revoker: Some(format!("agent{n}@contoso.com")),
            comment: None,
            actions: Vec::new(),
        };
        store
            .insert_revocation("kiosk", &format!("trail-{n}"), "hash", &plan, &[])
            .expect("insert");
    }
    drop(store);

    let started = std::time::Instant::now();
    let (status, next, first) = list_page(&daemon, "/v1/revocations?$filter=id%20eq%201");
    eprintln!("`id eq 1` over 1,200: {:?}", started.elapsed());
    assert_eq!((status, next, ids(&first)), (200, None, vec![1]), "{first}");
    let (_, _, found) = list_page(
        &daemon,
        "/v1/revocations?$filter=revoker%20eq%20'agent7@contoso.com'",
    );
    assert_eq!(ids(&found), [7]);
    let older = format!(
        "/v1/revocations?$filter=card_id%20eq%20'{:032X}'%20and%20id%20le%20100",
        3
    );
    let (_, _, found) = list_page(&daemon, &older);
    let expected: Vec<i64> = (1..=100).rev().filter(|n| n % 7 == 3).collect();
    assert_eq!(ids(&found), expected);

    let mut target = Some("/v1/revocations?$top=500".to_string());
    let mut pages = Vec::new();
    while let Some(t) = target.take() {
        assert!(pages.len() < 5, "more pages than 1,200 / 500 make");
        let (status, next, page) = list_page(&daemon, &t);
        assert_eq!(status, 200, "{t}: {page}");
        pages.push(ids(&page));
        target = next;
    }
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [500, 500, 200]);
    let all: Vec<i64> = pages.concat();
    assert_eq!(all, (1..=1200).rev().collect::<Vec<i64>>());

    let (status, _, body) = list_page(&daemon, "/v1/revocations?$top=501");
    assert_eq!(status, 400, "{body}");
}
