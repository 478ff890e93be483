//! The helpdesk console in a real browser: Debian's chromium driven by playwright-core
//! (`hw-tests/console/flow.mjs`). It signs in with the link `cardbridge console` prints, sees a
//! virtual card appear on insertion with its verdict, revokes its certificates through the
//! dialog, sees the revocation succeed, and sees the removed card disappear. Screenshots of
//! those states go to `target/console/`. Also: the sign-in rules, without a browser.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::Duration;

use common::daemon::{http, Daemon, ADMIN, TOKEN};
use common::run_cardbridge;
use hw_tests::rig::{insert_virtual, Rig};
use hw_tests::vcard::{CardSpec, VirtualCard};
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The sign-in link `cardbridge console` prints for the admin client.
fn sign_in_link(daemon: &Daemon) -> String {
    let token_file = daemon.dir.join("admin-token");
    std::fs::write(&token_file, ADMIN).expect("token file");
    let url = format!("http://127.0.0.1:{}", daemon.port);
    let out = run_cardbridge(
        &[
            "console",
            "--no-browser",
            "--url",
            &url,
            "--token-file",
            &token_file.to_string_lossy(),
        ],
        &[],
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    printed
        .split_whitespace()
        .find(|w| w.starts_with("http://") && w.contains("#code="))
        .unwrap_or_else(|| panic!("no link in {printed}"))
        .to_string()
}

/// Starts the browser script `script` (in `hw-tests/console/`) on the sign-in link: the process,
/// its stdin (what the test tells it) and its stdout lines (what it reports).
fn browser_flow(
    script: &str,
    link: &str,
    shots: &Path,
) -> (
    std::process::Child,
    std::process::ChildStdin,
    Receiver<String>,
) {
    let mut flow = Command::new("node")
        .arg(workspace().join("hw-tests/console").join(script))
        .arg(link)
        .arg(shots)
        .env("PLAYWRIGHT_DIR", workspace().join("target/playwright"))
        .current_dir(workspace().join("target/playwright"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node is installed");
    let to_flow = flow.stdin.take().expect("stdin");
    let (tx, lines) = channel();
    let stdout = flow.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (flow, to_flow, lines)
}

/// The script's stdout lines, each waited for with a deadline.
fn expect_line(lines: &Receiver<String>, wanted: &str) {
    match lines.recv_timeout(Duration::from_secs(90)) {
        Ok(line) if line == wanted => {}
        Ok(line) => panic!("the browser flow printed {line:?}, not {wanted}"),
        Err(RecvTimeoutError::Disconnected) => {
            panic!("the browser flow ended without printing {wanted} (its stderr says why)")
        }
        Err(RecvTimeoutError::Timeout) => {
            panic!("the browser flow did not print {wanted} within 90 s")
        }
    }
}

#[test]
fn a_helpdesk_person_signs_in_sees_the_card_revokes_it_and_sees_it_go() {
    let playwright = workspace().join("target/playwright/node_modules");
    assert!(
        playwright.join("playwright-core").exists(),
        "playwright-core is missing: hw-tests/run-tests installs it into target/playwright"
    );
    let shots = workspace().join("target/console");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    common::wait_for_card(&slot.reader, false);
    let vcard = VirtualCard::new(CardSpec::piv_four_certs()).expect("virtual card");
    let card_id = vcard.truth.card_id.clone().expect("card id");
    let sim = common::simulator_knowing(&vcard.truth, true);
    let config = format!(
        "[cm]\nbase_url = \"{}\"\n[scepman]\nbase_url = \"{}\"\n\
         [revocation]\nretry_initial_ms = 200\nretry_max_ms = 1000\npoll_interval_ms = 200\n",
        sim.cm_base_url(),
        sim.scepman_base_url()
    );
    let daemon = Daemon::start("console-browser", &config);
    let link = sign_in_link(&daemon);

    let (mut flow, mut to_flow, lines) = browser_flow("flow.mjs", &link, &shots);

    expect_line(&lines, "READY");
    let inserted = insert_virtual(vcard, &slot).expect("insert the card");
    writeln!(to_flow, "{card_id}").expect("to the flow");
    expect_line(&lines, "REVOKED");
    inserted.remove();
    writeln!(to_flow, "removed").expect("to the flow");
    expect_line(&lines, "DONE");
    drop(to_flow);
    let status = flow.wait().expect("the flow ends");
    assert!(status.success(), "the browser flow failed: {status}");
    for shot in [
        "console-card.png",
        "console-revoke-dialog.png",
        "console-revoked.png",
        "console-removed.png",
    ] {
        assert!(shots.join(shot).exists(), "{shot} was not saved");
    }
}

/// POST /v1/console/session from `origin` with `body`.
fn open_session(daemon: &Daemon, origin: &str, body: &str) -> (u16, Value) {
    let (status, text) = http(
        daemon.port,
        "POST",
        "/v1/console/session",
        &[("Origin", origin), ("Content-Type", "application/json")],
        body,
    );
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[test]
fn a_sign_in_code_works_once_from_the_consoles_own_page_only() {
    let daemon = Daemon::start("console-rules", "");
    let own = format!("http://127.0.0.1:{}", daemon.port);
    // Another page cannot trade a code, and the code is not spent by that.
    let first = code_of(&sign_in_link(&daemon));
    let body = format!("{{\"code\":\"{first}\"}}");
    let (status, _) = open_session(&daemon, "https://evil.example", &body);
    assert_eq!(status, 403);
    let (status, session) = open_session(&daemon, &own, &body);
    assert_eq!(status, 201, "{session}");
    assert_eq!(session["client"], "admin (console)");
    let (status, _) = open_session(&daemon, &own, &body);
    assert_eq!(status, 401, "a code works once");

    // The session works from the console's origin, not from another, and the token of a
    // configured client does not gain the console's origin.
    let token = session["token"].as_str().unwrap_or_default().to_string();
    let get = |auth: &str, origin: &str| {
        http(
            daemon.port,
            "GET",
            "/v1/cards",
            &[("Authorization", auth), ("Origin", origin)],
            "",
        )
        .0
    };
    assert_eq!(get(&format!("Bearer {token}"), &own), 200);
    assert_eq!(
        get(&format!("Bearer {token}"), "https://kiosk.contoso.com"),
        403
    );
    assert_eq!(get(&format!("Bearer {ADMIN}"), &own), 403);

    // A typed token opens a session too; a wrong one does not.
    let (status, typed) = open_session(&daemon, &own, &format!("{{\"token\":\"{TOKEN}\"}}"));
    assert_eq!(
        (status, typed["scopes"].clone()),
        (201, serde_json::json!(["read"]))
    );
    let (status, _) = open_session(&daemon, &own, "{\"token\":\"wrong\"}");
    assert_eq!(status, 401);

    // The page is served without a token, with a strict content policy; the Host rule holds.
    let (status, page) = http(daemon.port, "GET", "/", &[], "");
    assert_eq!(status, 200);
    assert!(page.contains("helpdesk console"));
    let (status, _) = http(daemon.port, "GET", "/", &[("Host", "evil.example")], "");
    assert_eq!(status, 421);
}

/// A request's answer head (status line and headers), lower case.
fn answer_head(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    let answer = common::daemon::http_raw(port, method, path, headers, body);
    answer
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// A sign-in code and a session token are credentials: no cache may keep the answers that
/// carry them, nor their refusals.
#[test]
fn sign_in_and_session_answers_are_not_stored() {
    let daemon = Daemon::start("console-no-store", "");
    let own = format!("http://127.0.0.1:{}", daemon.port);
    let json = ("Content-Type", "application/json");
    let bearer = format!("Bearer {ADMIN}");
    let code = answer_head(
        daemon.port,
        "POST",
        "/v1/console/sign-in",
        &[("Authorization", &bearer), json],
        "{}",
    );
    assert!(code.starts_with("http/1.1 201"), "{code}");
    assert!(code.contains("cache-control: no-store"), "{code}");
    let token_body = format!("{{\"token\":\"{TOKEN}\"}}");
    for body in [token_body.as_str(), "{\"code\":\"wrong\"}"] {
        let session = answer_head(
            daemon.port,
            "POST",
            "/v1/console/session",
            &[("Origin", &own), json],
            body,
        );
        assert!(
            session.contains("cache-control: no-store"),
            "{body}: {session}"
        );
    }
}

/// G5: a certificate whose holder name carries a right-to-left override. In the console the
/// control is shown as its code point, the name is isolated and the card id is drawn left to
/// right, in the heading and in the revoke confirmation (`hw-tests/console/bidi.mjs`); in the
/// API the card carries a note naming the field and the control.
#[test]
fn bidi_controls_in_a_card_cannot_reverse_what_the_helpdesk_reads() {
    let shots = workspace().join("target/console");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    common::wait_for_card(&slot.reader, false);
    let spec = CardSpec {
        holder: Some("Mallory \u{202E}3A2B1C".into()),
        ..CardSpec::piv_four_certs()
    };
    let vcard = VirtualCard::new(spec).expect("virtual card");
    let card_id = vcard.truth.card_id.clone().expect("card id");
    let daemon = Daemon::start("console-bidi", "");
    let link = sign_in_link(&daemon);
    let (mut flow, mut to_flow, lines) = browser_flow("bidi.mjs", &link, &shots);
    expect_line(&lines, "READY");
    let inserted = insert_virtual(vcard, &slot).expect("insert the card");
    writeln!(to_flow, "{card_id}").expect("to the flow");
    expect_line(&lines, "DONE");
    drop(to_flow);
    let status = flow.wait().expect("the flow ends");
    // The API marks the field for every other client: a note naming the field and the control.
    let auth = format!("Bearer {TOKEN}");
    let (_, text) = daemon.get(&format!("/v1/cards/{card_id}"), &[("Authorization", &auth)]);
    inserted.remove();
    assert!(status.success(), "the browser flow failed: {status}");
    let card: Value = serde_json::from_str(&text).expect("card JSON");
    let notes = card["notes"].to_string();
    assert!(
        notes.contains("subject of the certificate in 9A") && notes.contains("U+202E"),
        "{notes}"
    );
}

/// G3: 256 console session requests without a token, each announcing a 100-byte body and
/// sending 1 byte, do not take the request slots a token holder needs: their own slots are
/// few, and they are cut at 2 s.
#[test]
fn slow_unauthenticated_session_requests_do_not_hold_a_token_holders_slot() {
    let daemon = Daemon::start("console-slow-bodies", "");
    let port = daemon.port;
    let own = format!("http://127.0.0.1:{port}");
    let slow: Vec<std::net::TcpStream> = (0..256)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
            write!(
                s,
                "POST /v1/console/session HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {own}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
            )
            .expect("send");
            s
        })
        .collect();
    // For 1.5 s (the slow requests are all dispatched within it; before, they then held all
    // 256 shared slots for 10 s), every token holder's request is answered.
    let auth = format!("Bearer {TOKEN}");
    let started = std::time::Instant::now();
    let mut probes = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let asked = std::time::Instant::now();
        let (status, body) = http(port, "GET", "/v1/health", &[("Authorization", &auth)], "");
        assert_eq!(status, 200, "probe {probes}: {body}");
        probes += 1;
        eprintln!("probe {probes}: {:?}", asked.elapsed());
    }
    // A slow body that got a slot is cut short (408) rather than held for 10 s.
    let mut first = slow.into_iter().next().expect("a slow request");
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let (status, _) = common::daemon::read_answer(&mut first);
    assert!(
        matches!(status, 408 | 503),
        "a slow session request got {status}"
    );
}

/// The code in a sign-in link.
fn code_of(link: &str) -> String {
    link.split("#code=").nth(1).unwrap_or_default().to_string()
}

/// POST /v1/console/sign-in with `auth`: the status and the code.
fn mint_code(port: u16, auth: &str) -> (u16, String) {
    let (status, text) = http(
        port,
        "POST",
        "/v1/console/sign-in",
        &[
            ("Authorization", auth),
            ("Content-Type", "application/json"),
        ],
        "{}",
    );
    let code = serde_json::from_str::<Value>(&text).unwrap_or_default()["code"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (status, code)
}

/// G1: a read-only client mints 2,000 sign-in codes and opens 200 console sessions. Codes and
/// sessions belong to the client that made them: its flood evicts only its own oldest, and the
/// admin's session and pending code stay good; the admin's requests are answered throughout.
#[test]
fn one_clients_flood_of_codes_and_sessions_signs_nobody_else_out() {
    let daemon = Daemon::start("console-flood", "");
    let port = daemon.port;
    let own = format!("http://127.0.0.1:{port}");
    let admin_code = code_of(&sign_in_link(&daemon));
    let (status, admin) = open_session(&daemon, &own, &format!("{{\"token\":\"{ADMIN}\"}}"));
    assert_eq!(status, 201, "{admin}");
    let admin_auth = format!("Bearer {}", admin["token"].as_str().unwrap_or_default());
    let kiosk = format!("Bearer {TOKEN}");
    let (status, kiosk_first) = mint_code(port, &kiosk);
    assert_eq!(status, 201);
    let rss_before = daemon.rss_kib();

    let flood_own = own.clone();
    let flood = std::thread::spawn(move || {
        for n in 0..2000 {
            assert_eq!(mint_code(port, &kiosk).0, 201, "code {n}");
        }
        for n in 0..200 {
            let (status, text) = http(
                port,
                "POST",
                "/v1/console/session",
                &[("Origin", &flood_own), ("Content-Type", "application/json")],
                &format!("{{\"token\":\"{TOKEN}\"}}"),
            );
            assert_eq!(status, 201, "session {n}: {text}");
        }
    });
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    while !flood.is_finished() {
        let asked = std::time::Instant::now();
        let (status, body) = http(
            port,
            "GET",
            "/v1/health",
            &[("Authorization", &admin_auth), ("Origin", &own)],
            "",
        );
        assert_eq!(status, 200, "the admin's session during the flood: {body}");
        slowest = slowest.max(asked.elapsed());
        probes += 1;
    }
    flood.join().expect("the flood ran");
    let rss_after = daemon.rss_kib();
    eprintln!(
        "admin requests during the flood: {probes}, slowest {slowest:?}; \
         RSS {rss_before} KiB before 2,000 codes and 200 sessions, {rss_after} KiB after"
    );

    let (status, body) = http(
        port,
        "GET",
        "/v1/cards",
        &[("Authorization", &admin_auth), ("Origin", &own)],
        "",
    );
    assert_eq!(status, 200, "the admin's session after the flood: {body}");
    let (status, body) = open_session(&daemon, &own, &format!("{{\"code\":\"{admin_code}\"}}"));
    assert_eq!(
        status, 201,
        "the admin's pending code after the flood: {body}"
    );
    let (status, _) = open_session(&daemon, &own, &format!("{{\"code\":\"{kiosk_first}\"}}"));
    assert_eq!(status, 401, "the flood evicted the kiosk's own first code");
}

/// G2: a console session cannot issue sign-in codes (so it cannot open more sessions under
/// fresh names), and it shares its client's event tickets: the chain of the admin and its
/// session gets 32 tickets in all, not 32 each.
#[test]
fn a_console_session_cannot_open_sessions_and_shares_its_clients_tickets() {
    let daemon = Daemon::start("console-chain", "");
    let port = daemon.port;
    let own = format!("http://127.0.0.1:{port}");
    let (status, session) = open_session(&daemon, &own, &format!("{{\"token\":\"{ADMIN}\"}}"));
    assert_eq!(status, 201, "{session}");
    let session_auth = format!("Bearer {}", session["token"].as_str().unwrap_or_default());
    let (status, body) = http(
        port,
        "POST",
        "/v1/console/sign-in",
        &[
            ("Authorization", &session_auth),
            ("Origin", &own),
            ("Content-Type", "application/json"),
        ],
        "{}",
    );
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("console_session"), "{body}");

    let admin_auth = format!("Bearer {ADMIN}");
    let mut granted = 0;
    for n in 0..100 {
        let auth = if n % 2 == 0 {
            &session_auth
        } else {
            &admin_auth
        };
        let (status, body) = http(
            port,
            "POST",
            "/v1/events/ticket",
            &[
                ("Authorization", auth),
                ("Content-Type", "application/json"),
            ],
            "{}",
        );
        match status {
            201 => granted += 1,
            429 => assert!(body.contains("too_many_tickets"), "{body}"),
            other => panic!("ticket {n}: {other} {body}"),
        }
    }
    eprintln!("event tickets granted to the admin and its console session: {granted}");
    assert_eq!(granted, 32);
}

/// Login CSRF: a page sends a signed-in console tab to a sign-in link of another client. The
/// console asks before switching: refused, the tab stays the admin's and the link's code is not
/// spent; accepted, the tab signs in with the link (`hw-tests/console/switch.mjs`).
#[test]
fn a_signed_in_console_asks_before_a_link_switches_who_it_is() {
    let shots = workspace().join("target/console");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let daemon = Daemon::start("console-switch", "");
    let own = format!("http://127.0.0.1:{}", daemon.port);
    let kiosk = format!("Bearer {TOKEN}");
    let (_, refused) = mint_code(daemon.port, &kiosk);
    let (_, wanted) = mint_code(daemon.port, &kiosk);
    let link = sign_in_link(&daemon);
    let (mut flow, mut to_flow, lines) = browser_flow("switch.mjs", &link, &shots);
    expect_line(&lines, "READY");
    writeln!(to_flow, "{own}/index.html#code={refused}").expect("to the flow");
    expect_line(&lines, "KEPT");
    writeln!(to_flow, "{own}/#code={wanted}").expect("to the flow");
    expect_line(&lines, "SWITCHED");
    drop(to_flow);
    let status = flow.wait().expect("the flow ends");
    assert!(status.success(), "the browser flow failed: {status}");
    let (status, body) = open_session(&daemon, &own, &format!("{{\"code\":\"{refused}\"}}"));
    assert_eq!(status, 201, "the refused link's code was spent: {body}");
}
