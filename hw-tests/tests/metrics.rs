//! End-to-end: the station's metrics as a central Prometheus sees them. `promtool` (Debian's
//! `prometheus` package) lints a live daemon's exposition, and the fleet's metrics listener
//! serves `/metrics` alone, behind its token when one is set.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::daemon::{http, Daemon, TOKEN};
use common::piv_card;
use sha2::{Digest, Sha256};

const SCRAPE_TOKEN: &str = "prometheus-scrape-token-42";

/// Runs `promtool check metrics` on `text`; returns whether it passed and what it said.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (apt-get install prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn promtool_accepts_a_live_daemons_metrics() {
    let (_shared, _slot, card, card_id) = piv_card();
    let sim = common::simulator_knowing(&card.truth, true);
    let config = format!(
        "[cm]\nbase_url = \"{}\"\n[scepman]\nbase_url = \"{}\"\n",
        sim.cm_base_url(),
        sim.scepman_base_url()
    );
    let daemon = Daemon::start("metrics-promtool", &config);
    daemon.wait_reconciliation(&card_id, "", "matched", |r| r["state"] == "matched");
    // A refused call, so every family has a sample.
    let _ = daemon.get("/v1/health", &[("Authorization", "Bearer wrong")]);
    let (status, text) = daemon.get("/metrics", &[("Authorization", &format!("Bearer {TOKEN}"))]);
    assert_eq!(status, 200);
    for family in [
        "cardbridge_card_reads_total{result=\"ok\"}",
        "cardbridge_card_read_duration_seconds_bucket",
        "cardbridge_reconciliations_total{verdict=\"ok\"}",
        "cardbridge_server_up{server=\"cm\"} 1",
        "cardbridge_server_up{server=\"scepman\"} 1",
        "cardbridge_readers",
        "cardbridge_pcscd_up 1",
        "cardbridge_outbox_oldest_queued_age_seconds 0",
        "cardbridge_http_refusals_total{code=\"bad_token\"}",
        "cardbridge_build_info{version=",
    ] {
        assert!(text.contains(family), "missing {family:?} in\n{text}");
    }
    let (passed, said) = promtool_check(&text);
    assert!(passed && said.trim().is_empty(), "promtool: {said}\n{text}");
}

#[test]
fn promtool_can_fail_on_a_misnamed_metric() {
    // The check above means something only if promtool objects to what breaks its rules.
    let (passed, said) = promtool_check(
        "# HELP cardbridge_read_ms Read time.\n# TYPE cardbridge_read_ms counter\ncardbridge_read_ms 3\n",
    );
    assert!(!passed, "{said}");
    assert!(said.contains("_total"), "{said}");
}

#[test]
fn the_metrics_listener_serves_only_metrics_and_asks_for_its_token() {
    let hash = hex::encode(Sha256::digest(SCRAPE_TOKEN.as_bytes()));
    let config = format!("[metrics]\nlisten = \"127.0.0.1:0\"\ntoken_sha256 = \"{hash}\"\n");
    let daemon = Daemon::start("metrics-listener", &config);
    let port = daemon.logged_port("metrics listening on http://127.0.0.1:", 0);
    let good = format!("Bearer {SCRAPE_TOKEN}");
    let api = format!("Bearer {TOKEN}");
    let cases: [(&str, Option<&str>, u16); 6] = [
        ("/metrics", Some(&good), 200),
        ("/metrics", None, 401),
        ("/metrics", Some("Bearer wrong"), 401),
        // The API's own tokens do not open it, nor does it serve the API.
        ("/metrics", Some(&api), 401),
        ("/v1/health", Some(&good), 404),
        ("/openapi.json", Some(&good), 404),
    ];
    for (path, auth, expected) in cases {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let (status, body) = http(port, "GET", path, &headers, "");
        assert_eq!(status, expected, "{path} with {auth:?}: {body}");
        if status == 200 {
            assert!(body.contains("cardbridge_build_info"), "{body}");
        }
    }
}

#[test]
fn without_a_token_the_metrics_listener_is_open_and_a_token_needs_a_listener() {
    let daemon = Daemon::start("metrics-open", "[metrics]\nlisten = \"127.0.0.1:0\"\n");
    let port = daemon.logged_port("metrics listening on http://127.0.0.1:", 0);
    let (status, body) = http(port, "GET", "/metrics", &[], "");
    assert_eq!(status, 200, "{body}");

    let config = Config::parse(&format!(
        "[metrics]\ntoken_sha256 = \"{}\"\n",
        "a".repeat(64)
    ));
    assert!(config.is_err_and(|e| e.contains("metrics.listen")));
}

use cardbridge::config::Config;

/// Without a token, the Host header keeps a web page that rebinds its own name to the station
/// out: addresses, `localhost` and the configured names are answered, any other name is 421.
/// With a token, any name is answered to the right token (a page cannot send it).
#[test]
fn without_a_token_the_metrics_listener_answers_only_its_own_names() {
    let config = "[metrics]\nlisten = \"127.0.0.1:0\"\nhosts = [\"kiosk-01.contoso.com\"]\n";
    let daemon = Daemon::start("metrics-hosts", config);
    let port = daemon.logged_port("metrics listening on http://127.0.0.1:", 0);
    let named = |host: &str| http(port, "GET", "/metrics", &[("Host", host)], "");
    for host in [
        "127.0.0.1",
        "localhost:9687",
        "kiosk-01.contoso.com:9687",
        "[::1]:1",
    ] {
        let (status, body) = named(host);
        assert_eq!(status, 200, "{host}: {body}");
    }
    for host in [
        "rebound.evil.example:9687",
        "kiosk-01.contoso.com.evil.example",
    ] {
        let (status, body) = named(host);
        assert_eq!(status, 421, "{host}: {body}");
        assert!(body.contains("foreign_host"), "{body}");
    }

    let hash = hex::encode(Sha256::digest(SCRAPE_TOKEN.as_bytes()));
    let config = format!("[metrics]\nlisten = \"127.0.0.1:0\"\ntoken_sha256 = \"{hash}\"\n");
    let daemon = Daemon::start("metrics-hosts-token", &config);
    let port = daemon.logged_port("metrics listening on http://127.0.0.1:", 0);
    let good = format!("Bearer {SCRAPE_TOKEN}");
    let (status, body) = http(
        port,
        "GET",
        "/metrics",
        &[
            ("Host", "prometheus-target.contoso.com:9687"),
            ("Authorization", &good),
        ],
        "",
    );
    assert_eq!(status, 200, "{body}");
}

/// A self-signed certificate for 127.0.0.1 and its key, written as PEM files (the key 0600).
fn tls_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    std::fs::create_dir_all(dir).expect("dir");
    let (cert_path, key_path) = (dir.join("metrics.pem"), dir.join("metrics.key"));
    std::fs::write(&cert_path, cert.pem()).expect("certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("key");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("mode");
    (cert_path, key_path)
}

/// A daemon whose metrics listener serves TLS with a certificate made in `dir` and asks for
/// [`SCRAPE_TOKEN`]: the daemon, the listener's port, and the certificate to trust.
fn tls_daemon(name: &str, dir: &std::path::Path) -> (Daemon, u16, std::path::PathBuf) {
    let (cert, key) = tls_files(dir);
    let hash = hex::encode(Sha256::digest(SCRAPE_TOKEN.as_bytes()));
    let config = format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\ntoken_sha256 = \"{hash}\"\ntls_certificate = \"{}\"\ntls_key = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let daemon = Daemon::start(name, &config);
    let port = daemon.logged_port("metrics listening on https://127.0.0.1:", 0);
    (daemon, port, cert)
}

/// GET /metrics over TLS with `openssl s_client`, trusting only `ca`; the whole answer.
fn https_get(port: u16, ca: &std::path::Path, token: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-verify_return_error", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(ca)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed");
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request.as_bytes())
        .expect("send");
    let out = child.wait_with_output().expect("openssl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_metrics_listener_serves_tls_with_the_stations_certificate() {
    let dir = common::TempDir::new("metrics-tls");
    let (_daemon, port, cert) = tls_daemon("metrics-tls", &dir);
    let answer = https_get(port, &cert, SCRAPE_TOKEN);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("cardbridge_build_info"), "{answer}");
    assert!(https_get(port, &cert, "wrong").starts_with("HTTP/1.1 401"));
    // Plain HTTP gets no answer from a TLS listener.
    let (status, _) = std::panic::catch_unwind(|| http(port, "GET", "/metrics", &[], ""))
        .unwrap_or((0, String::new()));
    assert_ne!(status, 200);
}

#[test]
fn a_tls_key_that_is_not_private_stops_the_daemon_at_startup() {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::TempDir::new("metrics-tls-open");
    let (cert, key) = tls_files(&dir);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("mode");
    let config_path = dir.join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "state_dir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\ntls_certificate = \"{}\"\ntls_key = \"{}\"\n",
            dir.join("state").display(),
            cert.display(),
            key.display()
        ),
    )
    .expect("config");
    let out = common::run_cardbridge(
        &["run", "--config", &config_path.to_string_lossy()],
        &[],
        std::time::Duration::from_secs(20),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("metrics.tls_key") && stderr.contains("chmod 600"),
        "{stderr}"
    );
}

/// G4: 200 connections to the TLS metrics listener that never start their handshake (no token
/// is needed to open them) do not keep a scrape with the token out: it is answered within a
/// few seconds while they stay open.
#[test]
fn connections_that_never_handshake_do_not_keep_a_scrape_out() {
    let dir = common::TempDir::new("metrics-tls-flood");
    let (_daemon, port, cert) = tls_daemon("metrics-tls-flood", &dir);
    let flood: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let started = std::time::Instant::now();
    let answer = https_get_within(port, &cert, SCRAPE_TOKEN, std::time::Duration::from_secs(8));
    let took = started.elapsed();
    assert!(
        answer
            .as_deref()
            .is_some_and(|a| a.starts_with("HTTP/1.1 200")),
        "no scrape within 8 s during the flood: {answer:?}"
    );
    eprintln!("scrape during a flood of 200 idle connections: {took:?}");
    drop(flood);
}

/// `https_get` with a deadline: `None` when openssl has not finished within `limit`.
fn https_get_within(
    port: u16,
    ca: &std::path::Path,
    token: &str,
    limit: std::time::Duration,
) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ca, token) = (ca.to_path_buf(), token.to_string());
    std::thread::spawn(move || {
        let _ = tx.send(https_get(port, &ca, &token));
    });
    rx.recv_timeout(limit).ok()
}

/// Wrong tokens on the metrics listener are slowed: past a burst of 20 (refilled at 5 a second)
/// they are answered 429, while the right token is still answered 200. 100 guesses overrun the
/// budget even at 100 ms each on a loaded machine.
#[test]
fn wrong_tokens_on_the_metrics_listener_are_throttled_and_the_right_one_gets_through() {
    let hash = hex::encode(Sha256::digest(SCRAPE_TOKEN.as_bytes()));
    let config = format!("[metrics]\nlisten = \"127.0.0.1:0\"\ntoken_sha256 = \"{hash}\"\n");
    let daemon = Daemon::start("metrics-guesses", &config);
    let port = daemon.logged_port("metrics listening on http://127.0.0.1:", 0);
    let statuses: Vec<u16> = (0..100)
        .map(|n| {
            let guess = format!("Bearer guess-{n}");
            http(port, "GET", "/metrics", &[("Authorization", &guess)], "").0
        })
        .collect();
    assert!(
        statuses.iter().all(|s| matches!(s, 401 | 429)),
        "{statuses:?}"
    );
    assert!(statuses.contains(&429), "never throttled: {statuses:?}");
    let good = format!("Bearer {SCRAPE_TOKEN}");
    let (status, body) = http(port, "GET", "/metrics", &[("Authorization", &good)], "");
    assert_eq!(status, 200, "{body}");
}

/// G4, per address: a client that connects and only then, a little later, starts its handshake
/// keeps its place while another address opens 300 connections that never handshake. They hold
/// 8 places and evict only their own; before, each new one ended the oldest handshake anywhere.
#[test]
fn a_flood_from_one_address_evicts_only_its_own_handshakes() {
    let dir = common::TempDir::new("metrics-tls-peers");
    let (_daemon, port, cert) = tls_daemon("metrics-tls-peers", &dir);
    let slow = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let flood: Vec<socket2::Socket> = (0..300)
        .map(|_| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            let from: std::net::SocketAddr = "127.0.0.2:0".parse().expect("address");
            s.bind(&from.into()).expect("bind 127.0.0.2");
            let to: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
            s.connect(&to.into()).expect("connect");
            s
        })
        .collect();
    let answer = scrape_over(slow, port, &cert, SCRAPE_TOKEN);
    assert!(
        answer
            .as_deref()
            .is_ok_and(|a| a.starts_with("HTTP/1.1 200")),
        "the slow client's scrape: {answer:?}"
    );
    drop(flood);
}

/// A scrape over an open TCP connection: the TLS handshake (rustls, trusting `ca`) starts now,
/// and the answer must come within 10 s.
fn scrape_over(
    stream: std::net::TcpStream,
    port: u16,
    ca: &std::path::Path,
    token: &str,
) -> std::io::Result<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::io::{Read, Write};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(std::io::Error::other)? {
        roots
            .add(c.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").map_err(std::io::Error::other)?;
    let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(std::io::Error::other)?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    write!(
        tls,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = Vec::new();
    match tls.read_to_end(&mut answer) {
        Ok(_) => {}
        // The server may close without close_notify once the answer is out.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
        Err(e) => return Err(e),
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}
