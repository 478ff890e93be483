//! End-to-end: `cardbridge run` with a virtual card and the CM simulator, through its local API.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{insert, run_cardbridge};
use hw_tests::rig::{cardbridge_bin, Rig};
use hw_tests::sim::{matching_record, Fixture, Simulator};
use hw_tests::vcard::CardSpec;
use sha2::{Digest, Sha256};

const TOKEN: &str = "kiosk-token-0123456789";
/// A second client that may also ask for a sync.
const HELPDESK: &str = "helpdesk-token-9876543210";
const ORIGIN: &str = "https://kiosk.contoso.com";

struct Daemon {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Daemon {
    fn start(name: &str, cm: &str) -> Daemon {
        Daemon::start_with(name, "", cm)
    }

    /// `api` goes into the `[api]` table, `cm` at the end of the file.
    fn start_with(name: &str, api: &str, cm: &str) -> Daemon {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir =
            std::env::temp_dir().join(format!("cardbridge-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let hash = hex::encode(Sha256::digest(TOKEN.as_bytes()));
        let helpdesk = hex::encode(Sha256::digest(HELPDESK.as_bytes()));
        let config = format!(
            "state_dir = \"{}\"\n[api]\nlisten = [\"127.0.0.1:{port}\"]\n{api}[[api.clients]]\nname = \"kiosk\"\n\
             token_sha256 = \"{hash}\"\nscopes = [\"read\"]\norigins = [\"{ORIGIN}\"]\n\
             [[api.clients]]\nname = \"helpdesk\"\ntoken_sha256 = \"{helpdesk}\"\nscopes = [\"read\", \"sync\"]\n{cm}",
            dir.join("state").display()
        );
        std::fs::write(dir.join("config.toml"), config).expect("config");
        let child = Command::new(cardbridge_bin())
            .args(["run", "--config"])
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start cardbridge run");
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < until, "cardbridge run did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, port, dir }
    }

    /// A raw HTTP/1.1 GET with the given extra headers; returns the status and body.
    fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        self.request("GET", path, headers, "")
    }

    /// A raw HTTP/1.1 request (raw, so that tests control every header, Host included).
    fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        use std::io::Write;
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            request.push_str(&format!("Host: 127.0.0.1:{}\r\n", self.port));
        }
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        s.write_all(request.as_bytes()).expect("send");
        read_answer(&mut s)
    }

    /// Opens the event stream (optionally resuming after `last`).
    fn events(&self, last: Option<u64>) -> BufReader<TcpStream> {
        use std::io::Write;
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .expect("timeout");
        let resume = last
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET /v1/events HTTP/1.1\r\nHost: localhost:{}\r\nAuthorization: Bearer {TOKEN}\r\n{resume}\r\n",
            self.port
        )
        .expect("send");
        BufReader::new(s)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: the graceful path (it must end the event streams and exit).
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let until = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads SSE frames until one whose event name satisfies `want`; returns (id, name, data).
fn next_event(
    stream: &mut BufReader<TcpStream>,
    want: impl Fn(&str, &str) -> bool,
) -> (u64, String, String) {
    let (mut id, mut name, mut data) = (0, String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        let n = stream.read_line(&mut line).expect("event stream open");
        assert!(n > 0, "event stream closed");
        let l = line.trim_end();
        if let Some(v) = l.strip_prefix("id:") {
            id = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("event:") {
            name = v.trim().to_string();
        } else if let Some(v) = l.strip_prefix("data:") {
            data.push_str(v.trim());
        } else if l.is_empty() && !name.is_empty() {
            if want(&name, &data) {
                return (id, name, data);
            }
            name.clear();
            data.clear();
        }
    }
}

#[test]
fn events_in_order_resume_and_rest() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    common::wait_for_card(&slot.reader, false);
    let sim = Simulator::start(Fixture::default(), 0).expect("simulator");
    let daemon = Daemon::start(
        "events",
        &format!("[cm]\nbase_url = \"{}\"\n", sim.cm_base_url()),
    );
    let mut stream = daemon.events(None);
    std::thread::sleep(Duration::from_millis(300));

    let card = insert(CardSpec::piv_four_certs(), &slot);
    sim.replace_fixture(Fixture {
        smartcards: vec![matching_record(&card.truth, false)],
        ..Fixture::default()
    });
    let mine = |data: &str| {
        data.contains(&slot.reader)
            || card
                .truth
                .card_id
                .as_deref()
                .is_some_and(|id| data.contains(id))
    };
    let (id1, ..) = next_event(&mut stream, |n, d| n == "card.inserted" && mine(d));
    let (id2, _, read) = next_event(&mut stream, |n, d| n.starts_with("card.read") && mine(d));
    let (id3, _, reconciled) = next_event(&mut stream, |n, d| n == "card.reconciled" && mine(d));
    assert!(id1 < id2 && id2 < id3, "{id1} {id2} {id3}");
    assert!(read.contains(card.truth.certificates[0].thumbprint.as_str()));
    assert!(reconciled.contains("\"state\":\"matched\""), "{reconciled}");

    // REST sees the same card.
    let auth = format!("Bearer {TOKEN}");
    let id = card.truth.card_id.clone().unwrap_or_default();
    let (status, body) = daemon.get(&format!("/v1/cards/{id}"), &[("Authorization", &auth)]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = daemon.get(
        &format!("/v1/cards/{id}/reconciliation"),
        &[("Authorization", &auth)],
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"verdict\":\"ok\""), "{body}");

    // A sync reads the card again and reconciles it again; it needs the sync scope and JSON.
    let sync = format!("/v1/cards/{id}/sync");
    let helpdesk = format!("Bearer {HELPDESK}");
    let json = ("Content-Type", "application/json");
    let (status, body) = daemon.request("POST", &sync, &[("Authorization", &auth), json], "{}");
    assert_eq!(status, 403, "read-only client: {body}");
    let (status, body) = daemon.request(
        "POST",
        &sync,
        &[("Authorization", &helpdesk), ("Content-Type", "text/plain")],
        "{}",
    );
    assert_eq!(status, 415, "{body}");
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(100 * 1024));
    let (status, _) = daemon.request("POST", &sync, &[("Authorization", &helpdesk), json], &big);
    assert_eq!(status, 413);
    let (status, body) = daemon.request("POST", &sync, &[("Authorization", &helpdesk), json], "{}");
    assert_eq!(status, 202, "{body}");
    next_event(&mut stream, |n, d| n == "card.read" && mine(d));
    next_event(&mut stream, |n, d| n == "card.reconciled" && mine(d));
    let store = cardbridge::store::Store::open(&daemon.dir.join("state")).expect("state database");
    let audit = store.audit().expect("audit");
    let outcomes: Vec<(String, u16)> = audit
        .iter()
        .map(|a| (a.client.clone(), a.outcome))
        .collect();
    // Every state-changing attempt of a known client is in the audit trail, refused ones too.
    let expected = [
        ("kiosk", 403),
        ("helpdesk", 415),
        ("helpdesk", 413),
        ("helpdesk", 202),
    ];
    assert_eq!(
        outcomes,
        expected.map(|(c, s)| (c.to_string(), s)),
        "{audit:?}"
    );

    // Metrics count what happened.
    let (status, metrics) = daemon.get("/metrics", &[("Authorization", &auth)]);
    assert_eq!(status, 200);
    for line in [
        "cardbridge_reconciliations_total{verdict=\"ok\"}",
        "cardbridge_api_requests_total{route=\"/v1/cards/{card_id}/sync\",status=\"202\"} 1",
        "cardbridge_read_duration_ms_count",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }

    // A client that reconnects after card.inserted gets what it missed, in order.
    let mut resumed = daemon.events(Some(id1));
    let (r2, ..) = next_event(&mut resumed, |_, _| true);
    assert_eq!(r2, id1 + 1);
    let (r3, ..) = next_event(&mut resumed, |n, d| n == "card.reconciled" && mine(d));
    assert_eq!(r3, id3);
    drop(resumed);

    // The client commands: `cards` and `events`.
    let token_file = daemon.dir.join("token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    let url = format!("http://127.0.0.1:{}", daemon.port);
    let token = token_file.to_string_lossy().into_owned();
    let out = run_cardbridge(
        &["cards", "--json", "--url", &url, "--token-file", &token],
        &[],
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains(card.truth.certificates[0].thumbprint.as_str()));
    let mut watcher = Command::new(cardbridge_bin())
        .args(["events", "--url", &url, "--token-file", &token])
        .stdout(Stdio::piped())
        .spawn()
        .expect("cardbridge events");
    std::thread::sleep(Duration::from_millis(300));

    card.remove();
    next_event(&mut stream, |n, d| {
        n == "card.removed" && d.contains(&slot.reader)
    });
    let lines = BufReader::new(watcher.stdout.take().expect("stdout")).lines();
    let seen = lines
        .map_while(Result::ok)
        .find(|l| l.contains("card.removed") && l.contains(&slot.reader));
    let _ = watcher.kill();
    let _ = watcher.wait();
    assert!(
        seen.is_some(),
        "cardbridge events did not print the removal"
    );
}

/// Name, request headers, expected status and error code.
type Case = (&'static str, Vec<(&'static str, String)>, u16, &'static str);

#[test]
fn every_security_rule_refuses_with_the_right_status() {
    let daemon = Daemon::start("security", "");
    let auth = format!("Bearer {TOKEN}");
    let port = daemon.port;
    let cases: Vec<Case> = vec![
        ("good", vec![("Authorization", auth.clone())], 200, ""),
        ("missing token", vec![], 401, "missing_token"),
        (
            "wrong token",
            vec![("Authorization", "Bearer wrong".into())],
            401,
            "bad_token",
        ),
        (
            "foreign host",
            vec![
                ("Authorization", auth.clone()),
                ("Host", format!("evil.example:{port}")),
            ],
            421,
            "foreign_host",
        ),
        (
            "foreign origin",
            vec![
                ("Authorization", auth.clone()),
                ("Origin", "https://evil.example".into()),
            ],
            403,
            "foreign_origin",
        ),
        (
            "allowed origin",
            vec![("Authorization", auth.clone()), ("Origin", ORIGIN.into())],
            200,
            "",
        ),
    ];
    for (name, headers, status, code) in cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (got, body) = daemon.get("/v1/health", &headers);
        assert_eq!(got, status, "{name}: {body}");
        assert!(body.contains(code), "{name}: {body}");
    }
    // A page guessing tokens is throttled; the kiosk's native client is not.
    let guessing = [
        ("Authorization", "Bearer guess"),
        ("Origin", "https://evil.example"),
    ];
    let statuses: Vec<u16> = (0..30)
        .map(|_| daemon.get("/v1/health", &guessing).0)
        .collect();
    // A burst of 20 failures is answered normally, then 429 (the bucket refills at 5/s, so a slow
    // machine may let one or two more through before the end).
    assert!(statuses[..20].iter().all(|s| *s == 401), "{statuses:?}");
    assert!(
        statuses[20..].iter().filter(|s| **s == 429).count() >= 5,
        "{statuses:?}"
    );
    assert_eq!(daemon.get("/v1/health", &[("Authorization", &auth)]).0, 200);
    let (status, document) = daemon.get("/openapi.json", &[("Authorization", &auth)]);
    assert_eq!(status, 200);
    assert!(
        document.contains("\"/v1/cards/{card_id}/sync\""),
        "{document}"
    );
}

/// The browser `EventSource` path: a ticket asked for with the token opens the stream once, from
/// the client's own origin only.
#[test]
fn an_event_ticket_opens_the_stream_once() {
    use std::io::Write;
    let daemon = Daemon::start("ticket", "");
    let auth = format!("Bearer {TOKEN}");
    let ticket = |daemon: &Daemon| -> String {
        let (status, body) = daemon.request(
            "POST",
            "/v1/events/ticket",
            &[("Authorization", &auth), ("Origin", ORIGIN)],
            "",
        );
        assert_eq!(status, 201, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        answer["ticket"].as_str().expect("ticket").to_string()
    };
    // The status line of a stream opened with a ticket (the stream itself stays open).
    let open = |ticket: &str, origin: &str| -> String {
        let mut s = TcpStream::connect(("127.0.0.1", daemon.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "GET /v1/events?ticket={ticket}&last_event_id=0 HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nOrigin: {origin}\r\n\r\n",
            daemon.port
        )
        .expect("send");
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).expect("status line");
        line
    };
    let good = ticket(&daemon);
    assert!(open(&good, ORIGIN).contains(" 200 "));
    assert!(
        open(&good, ORIGIN).contains(" 401 "),
        "a ticket is good once"
    );
    let stolen = ticket(&daemon);
    assert!(open(&stolen, "https://evil.example").contains(" 403 "));
    // A ticket is not a token for any other route.
    let other = ticket(&daemon);
    let (status, _) = daemon.get(&format!("/v1/cards?ticket={other}"), &[]);
    assert_eq!(status, 401);
}

#[test]
fn a_non_loopback_listen_address_is_refused_at_startup() {
    let dir = std::env::temp_dir().join(format!("cardbridge-api-listen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("config.toml");
    std::fs::write(&config, "[api]\nlisten = [\"0.0.0.0:8687\"]\n").expect("config");
    let out = run_cardbridge(
        &["run", "--config", &config.to_string_lossy()],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads a whole `Connection: close` HTTP/1.1 answer: its status and body.
fn read_answer(stream: &mut impl std::io::Read) -> (u16, String) {
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// The uid and primary gid of this test process.
fn my_ids() -> (u32, u32) {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let id = |key: &str| -> u32 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .expect("id")
    };
    (id("Uid:"), id("Gid:"))
}

fn unix_get(path: &std::path::Path, route: &str) -> (u16, String) {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(path).expect("connect to the socket");
    write!(
        s,
        "GET {route} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    read_answer(&mut s)
}

#[test]
fn the_unix_socket_maps_the_callers_uid_to_scopes() {
    use std::os::unix::fs::PermissionsExt;
    let (uid, gid) = my_ids();
    let socket = std::env::temp_dir().join(format!("cardbridge-api-{}.sock", std::process::id()));
    let allowed = format!(
        "unix_socket = \"{}\"\n[[api.local_users]]\nuid = {uid}\nscopes = [\"read\"]\n",
        socket.display()
    );
    {
        let _daemon = Daemon::start_with("unix-ok", &allowed, "");
        let mode = std::fs::metadata(&socket)
            .expect("socket exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660);
        let (status, body) = unix_get(&socket, "/v1/health");
        assert_eq!(status, 200, "{body}");
        // The administrator's client command over the socket needs no token.
        let out = run_cardbridge(
            &["cards", "--json", "--socket", &socket.to_string_lossy()],
            &[("CARDBRIDGE_TOKEN", "")],
            Duration::from_secs(10),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cards: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON cards");
        assert!(cards.is_array(), "{cards}");
    }
    assert!(!socket.exists(), "the socket file is removed at shutdown");

    // Scopes for someone else only: this uid (and gid) is refused.
    let others = format!(
        "unix_socket = \"{}\"\n[[api.local_users]]\nuid = {}\ngid = {}\nscopes = [\"read\"]\n",
        socket.display(),
        uid.wrapping_add(4242),
        gid.wrapping_add(4242)
    );
    let _daemon = Daemon::start_with("unix-refused", &others, "");
    let (status, body) = unix_get(&socket, "/v1/health");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no_scopes"), "{body}");
    let out = run_cardbridge(
        &["cards", "--socket", &socket.to_string_lossy()],
        &[],
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_scopes"));
}
