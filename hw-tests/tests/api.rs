//! End-to-end: `cardbridge run` with a virtual card and the CM simulator, through its local API.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::daemon::{next_event, read_answer, Daemon, HELPDESK, ORIGIN, TOKEN};
use common::{eventually, run_cardbridge};
use hw_tests::rig::{cardbridge_bin, insert_virtual, Rig};
use hw_tests::sim::{matching_record, Fixture, Simulator};
use hw_tests::vcard::{CardSpec, VirtualCard};

/// A hold on the shared rig: shared with other tests, or exclusive.
enum RigLease {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Exclusive(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

/// A daemon with the CM simulator, an event stream opened before the insertion, and a PIV card
/// inserted, read and reconciled; `ids` are the event ids of `card.inserted`, `card.read` and
/// `card.reconciled`.
struct Reconciled {
    _rig: RigLease,
    slot: hw_tests::rig::Slot,
    _sim: Simulator,
    daemon: Daemon,
    stream: BufReader<TcpStream>,
    card: hw_tests::vpcd::Inserted,
    card_id: String,
    ids: [u64; 3],
    read: String,
    reconciled: String,
}

impl Reconciled {
    fn start(name: &str) -> Reconciled {
        Reconciled::start_leased(name, RigLease::Shared(Rig::get().shared()))
    }

    /// With the rig to itself: no other test's card is read by this daemon, so station-wide
    /// counts are this test's alone. pcscd may still show the card a test just pulled from the
    /// other slot (it polls vpcd), so every slot must look empty before the daemon starts.
    fn start_alone(name: &str) -> Reconciled {
        let lease = RigLease::Exclusive(Rig::get().exclusive());
        for slot in 0..hw_tests::rig::SLOTS {
            common::wait_for_card(&hw_tests::rig::reader_name(slot), false);
        }
        Reconciled::start_leased(name, lease)
    }

    /// The simulator has the card's record before the card goes in, so the first
    /// reconciliation already matches.
    fn start_leased(name: &str, lease: RigLease) -> Reconciled {
        let slot = Rig::get().slot();
        common::wait_for_card(&slot.reader, false);
        let vcard = VirtualCard::new(CardSpec::piv_four_certs()).expect("virtual card");
        let fixture = Fixture {
            smartcards: vec![matching_record(&vcard.truth, false)],
            ..Fixture::default()
        };
        let sim = Simulator::start(fixture, 0).expect("simulator");
        let daemon = Daemon::start(
            name,
            &format!("[cm]\nbase_url = \"{}\"\n", sim.cm_base_url()),
        );
        let mut stream = daemon.events(None);
        let card = insert_virtual(vcard, &slot).expect("insert the virtual card");
        let card_id = card.truth.card_id.clone().expect("card id");
        let mine = |d: &str| d.contains(&slot.reader) || d.contains(&card_id);
        let (inserted, ..) = next_event(&mut stream, |n, d| n == "card.inserted" && mine(d));
        let (read_id, _, read) =
            next_event(&mut stream, |n, d| n.starts_with("card.read") && mine(d));
        let (reconciled_id, _, reconciled) =
            next_event(&mut stream, |n, d| n == "card.reconciled" && mine(d));
        Reconciled {
            _rig: lease,
            slot,
            _sim: sim,
            daemon,
            stream,
            card,
            card_id,
            ids: [inserted, read_id, reconciled_id],
            read,
            reconciled,
        }
    }

    /// Whether an event's data is about this test's reader or card.
    fn mine(&self, data: &str) -> bool {
        data.contains(&self.slot.reader) || data.contains(&self.card_id)
    }

    /// POST /v1/cards/{id}/sync with these headers and body.
    fn sync(&self, token: &str, content_type: &str, body: &str) -> (u16, String) {
        let auth = format!("Bearer {token}");
        self.daemon.request(
            "POST",
            &format!("/v1/cards/{}/sync", self.card_id),
            &[("Authorization", &auth), ("Content-Type", content_type)],
            body,
        )
    }

    /// A token file for the client commands, and the daemon's URL.
    fn client_args(&self) -> (String, String) {
        let token_file = self.daemon.dir.join("token");
        std::fs::write(&token_file, TOKEN).expect("token file");
        let url = format!("http://127.0.0.1:{}", self.daemon.port);
        (url, token_file.to_string_lossy().into_owned())
    }
}

fn kiosk() -> String {
    format!("Bearer {TOKEN}")
}

#[test]
fn an_insertion_is_inserted_read_and_reconciled_in_order() {
    let t = Reconciled::start("events-order");
    let [inserted, read, reconciled] = t.ids;
    assert!(inserted < read && read < reconciled, "{:?}", t.ids);
    assert!(t
        .read
        .contains(t.card.truth.certificates[0].thumbprint.as_str()));
    assert!(
        t.reconciled.contains("\"state\":\"matched\""),
        "{}",
        t.reconciled
    );
}

#[test]
fn rest_shows_the_card_and_its_reconciliation() {
    let t = Reconciled::start("events-rest");
    let auth = kiosk();
    let (status, body) = t.daemon.get(
        &format!("/v1/cards/{}", t.card_id),
        &[("Authorization", &auth)],
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(t.card.truth.certificates[0].thumbprint.as_str()),
        "{body}"
    );
    let (status, body) = t.daemon.get(
        &format!("/v1/cards/{}/reconciliation", t.card_id),
        &[("Authorization", &auth)],
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"verdict\":\"ok\""), "{body}");
}

#[test]
fn a_sync_needs_its_scope_and_json_and_every_attempt_is_audited() {
    let mut t = Reconciled::start("events-sync");
    let json = "application/json";
    let (status, body) = t.sync(TOKEN, json, "{}");
    assert_eq!(status, 403, "read-only client: {body}");
    let (status, body) = t.sync(HELPDESK, "text/plain", "{}");
    assert_eq!(status, 415, "{body}");
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(100 * 1024));
    let (status, _) = t.sync(HELPDESK, json, &big);
    assert_eq!(status, 413);
    let (status, body) = t.sync(HELPDESK, json, "{}");
    assert_eq!(status, 202, "{body}");
    // The sync reads the card again and reconciles it again.
    let (read, ..) = next_event(&mut t.stream, |n, d| {
        n == "card.read" && d.contains(&t.card_id)
    });
    let (reconciled, ..) = next_event(&mut t.stream, |n, d| {
        n == "card.reconciled" && d.contains(&t.card_id)
    });
    assert!(t.ids[2] < read && read < reconciled);

    // Every state-changing attempt of a known client is in the audit trail, refused ones too.
    let store =
        cardbridge::store::Store::open(&t.daemon.dir.join("state")).expect("state database");
    let audit = store.audit().expect("audit");
    let outcomes: Vec<(String, u16)> = audit
        .iter()
        .map(|a| (a.client.clone(), a.outcome))
        .collect();
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
}

#[test]
fn metrics_count_reads_reconciliations_and_requests() {
    let mut t = Reconciled::start_alone("events-metrics");
    let (status, body) = t.sync(HELPDESK, "application/json", "{}");
    assert_eq!(status, 202, "{body}");
    next_event(&mut t.stream, |n, d| {
        n == "card.reconciled" && d.contains(&t.card_id)
    });
    let (status, metrics) = t.daemon.get("/metrics", &[("Authorization", &kiosk())]);
    assert_eq!(status, 200);
    for line in [
        "cardbridge_reconciliations_total{verdict=\"ok\"} 2",
        "cardbridge_http_requests_total{route=\"/v1/cards/{card_id}/sync\",status=\"202\"} 1",
        // The insertion and the sync: two reads.
        "cardbridge_card_reads_total{result=\"ok\"} 2",
        "cardbridge_card_read_duration_seconds_count 2",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
}

#[test]
fn a_client_that_reconnects_gets_what_it_missed_in_order() {
    let t = Reconciled::start("events-resume");
    let [inserted, _, reconciled] = t.ids;
    let mut resumed = t.daemon.events(Some(inserted));
    let (next, ..) = next_event(&mut resumed, |_, _| true);
    assert_eq!(next, inserted + 1);
    let (last, ..) = next_event(&mut resumed, |n, d| n == "card.reconciled" && t.mine(d));
    assert_eq!(last, reconciled);
}

/// Event ids grow across restarts: a client that resumes with an id from before the daemon
/// restarted (a browser's EventSource does) is told to resync, not handed the new daemon's events
/// as all it missed (a card pulled meanwhile would stay on its screen).
#[test]
fn a_client_that_resumes_after_a_restart_is_told_to_resync() {
    let _rig = Rig::get().shared();
    let mut daemon = Daemon::start("events-restart", "");
    let (last, ..) = next_event(&mut daemon.events(Some(0)), |_, _| true);
    daemon.kill9();
    daemon.restart();
    let (_, name, _) = next_event(&mut daemon.events(Some(last)), |_, _| true);
    assert_eq!(name, "resync");
}

#[test]
fn the_cards_command_prints_the_card() {
    let t = Reconciled::start("events-cards-cli");
    let (url, token) = t.client_args();
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
        .contains(t.card.truth.certificates[0].thumbprint.as_str()));
}

#[test]
fn a_removed_card_is_announced_and_leaves_the_list() {
    let Reconciled {
        mut stream,
        card,
        slot,
        daemon,
        card_id,
        _rig,
        ..
    } = Reconciled::start("events-removal");
    card.remove();
    next_event(&mut stream, |n, d| {
        n == "card.removed" && d.contains(&slot.reader)
    });
    let (status, cards) = daemon.get("/v1/cards", &[("Authorization", &kiosk())]);
    assert_eq!(status, 200);
    assert!(
        !cards.contains(&card_id),
        "a removed card is gone from /v1/cards: {cards}"
    );
}

/// `cardbridge events` as a child process whose lines arrive through a channel, so every wait
/// for one has a deadline.
struct Watcher {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watcher {
    fn start(url: &str, token: &str) -> Watcher {
        let mut child = Command::new(cardbridge_bin())
            .args(["events", "--url", url, "--token-file", token])
            .stdout(Stdio::piped())
            .spawn()
            .expect("cardbridge events");
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watcher { child, lines }
    }

    /// The first line within `within` for which `wanted` holds.
    fn printed(&self, within: Duration, wanted: impl Fn(&str) -> bool) -> Option<String> {
        let until = Instant::now() + within;
        while let Ok(line) = self
            .lines
            .recv_timeout(until.saturating_duration_since(Instant::now()))
        {
            if wanted(&line) {
                return Some(line);
            }
        }
        None
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_events_command_prints_events_as_they_happen() {
    let t = Reconciled::start("events-cli");
    let (url, token) = t.client_args();
    let watcher = Watcher::start(&url, &token);
    // Readiness: the watcher is connected once it prints an event caused after it started.
    eventually(
        "cardbridge events to connect",
        Duration::from_secs(15),
        || {
            let (status, _) = t.sync(HELPDESK, "application/json", "{}");
            assert_eq!(status, 202);
            watcher.printed(Duration::from_secs(2), |l| l.contains("card.read"))
        },
    );
    let Reconciled { card, slot, .. } = t;
    card.remove();
    let removal = watcher.printed(Duration::from_secs(15), |l| {
        l.contains("card.removed") && l.contains(&slot.reader)
    });
    assert!(
        removal.is_some(),
        "cardbridge events did not print the removal within 15 s"
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
    // The daemon's budget is a burst of 20 failures for everyone together (the "wrong token"
    // case above spent one), then 429 (it refills at 5/s, so a slow machine may let one or two
    // more through before the end).
    let answered = statuses.iter().filter(|s| **s == 401).count();
    assert!((19..=21).contains(&answered), "{statuses:?}");
    assert!(statuses[..19].iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(
        answered + statuses.iter().filter(|s| **s == 429).count(),
        30,
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

/// Four clients asking for the cards at once, so that every thread of the daemon's runtime
/// allocates while another does.
fn load_from_four_clients(daemon: &Daemon) {
    let port = daemon.port;
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..100 {
                    let auth = format!("Bearer {TOKEN}");
                    let (status, body) = common::daemon::http(
                        port,
                        "GET",
                        "/v1/cards",
                        &[("Authorization", &auth)],
                        "",
                    );
                    assert_eq!(status, 200, "{body}");
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client");
    }
}

/// The heaps glibc's allocator made for the daemon's threads besides the main one. Each is a
/// reservation of 64 MiB (`HEAP_MAX_SIZE` on 64-bit) at an address aligned to its size, mapped
/// anonymously: its used part read-write, the rest without access up to its end. The kernel may
/// merge a heap's mappings with anonymous neighbours, so a heap is counted by what cannot
/// merge away: a no-access mapping ending at a 64 MiB boundary, with anonymous memory all the
/// way back to the boundary before.
fn thread_heaps(pid: u32) -> usize {
    const HEAP: u64 = 64 << 20;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let mut spans: Vec<(u64, u64)> = Vec::new();
    let mut no_access_ends = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(range), Some(perms), None) = (fields.first(), fields.get(1), fields.get(5))
        else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        match spans.last_mut() {
            Some(span) if span.1 == start => span.1 = end,
            _ => spans.push((start, end)),
        }
        if *perms == "---p" && end % HEAP == 0 {
            no_access_ends.push(end);
        }
    }
    no_access_ends
        .iter()
        .filter(|&&end| {
            spans
                .iter()
                .any(|&(from, to)| from <= end - HEAP && end <= to)
        })
        .count()
}

#[test]
fn the_daemon_keeps_two_heaps_however_many_threads_allocate() {
    let daemon = Daemon::start("heaps", "");
    load_from_four_clients(&daemon);
    let heaps = thread_heaps(daemon.pid());
    assert_eq!(
        heaps + 1,
        cardbridge::malloc::ARENAS as usize,
        "the main heap and {heaps} for threads"
    );
}

#[test]
fn an_administrators_own_heap_limit_is_kept() {
    let daemon = Daemon::start_env(
        "heaps-set",
        "",
        "",
        vec![("MALLOC_ARENA_MAX".into(), "8".into())],
    );
    load_from_four_clients(&daemon);
    let heaps = thread_heaps(daemon.pid());
    assert!(
        (cardbridge::malloc::ARENAS as usize..8).contains(&heaps),
        "MALLOC_ARENA_MAX=8: the main heap and {heaps} for threads"
    );
}
