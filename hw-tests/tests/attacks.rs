//! The attacks of the local-API security review (F1–F6 and its notes), each replayed against a
//! real `cardbridge run`: every one of them succeeded once.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::daemon::{Daemon, ADMIN, HELPDESK, ORIGIN, TOKEN};

/// A raw request on a fresh connection; returns the whole answer, headers included.
fn raw(daemon: &Daemon, request: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", daemon.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn f1_requests_without_a_token_lock_nobody_out() {
    let daemon = Daemon::start("f1", "");
    let auth = format!("Bearer {TOKEN}");
    // What an <img> tag on any web page sends: no token, no Origin.
    for _ in 0..40 {
        assert_eq!(daemon.get("/v1/health", &[]).0, 401);
    }
    // Wrong tokens spend the budget; a valid token is still served, with or without Origin.
    for _ in 0..40 {
        let _ = daemon.get("/v1/health", &[("Authorization", "Bearer wrong")]);
    }
    assert_eq!(daemon.get("/v1/health", &[("Authorization", &auth)]).0, 200);
    let from_page = [("Authorization", auth.as_str()), ("Origin", ORIGIN)];
    assert_eq!(daemon.get("/v1/health", &from_page).0, 200);
    let config = daemon.dir.join("config.toml").display().to_string();
    let url = format!("http://127.0.0.1:{}", daemon.port);
    let cli = common::run_cardbridge(
        &["cards", "--config", &config, "--url", &url],
        &[("CARDBRIDGE_TOKEN", TOKEN)],
        Duration::from_secs(10),
    );
    assert!(
        cli.status.success(),
        "the CLI is not refused: {}",
        String::from_utf8_lossy(&cli.stderr)
    );
}

#[test]
fn f2_a_new_origin_buys_no_new_guesses() {
    let daemon = Daemon::start("f2", "");
    let started = Instant::now();
    let statuses: Vec<u16> = (0..200)
        .map(|n| {
            let origin = format!("http://bypass{n}.example");
            let guess = format!("Bearer {n:064x}");
            daemon
                .get(
                    "/v1/health",
                    &[("Authorization", &guess), ("Origin", &origin)],
                )
                .0
        })
        .collect();
    let answered = statuses.iter().filter(|s| **s == 401).count();
    println!("{answered} of 200 guesses with 200 distinct Origins answered 401, the rest 429");
    // 20 at once, then 5 a second while the loop ran.
    let allowed = 20 + (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        answered <= allowed,
        "{answered} guesses answered, at most {allowed}"
    );
    assert_eq!(
        answered + statuses.iter().filter(|s| **s == 429).count(),
        200
    );
}

#[test]
fn f3_distinct_origins_do_not_grow_memory() {
    let daemon = Daemon::start("f3", "");
    let pad = "x".repeat(4000);
    let mut s = TcpStream::connect(("127.0.0.1", daemon.port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut buffer = [0u8; 4096];
    let send = |s: &mut TcpStream, buffer: &mut [u8], i: usize| {
        let request = format!(
            "GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nOrigin: https://{pad}{i}.example\r\n\r\n",
            daemon.port
        );
        s.write_all(request.as_bytes()).expect("send");
        let _ = s.read(buffer).expect("answer");
    };
    for i in 0..1000 {
        send(&mut s, &mut buffer, i);
    }
    let before = daemon.rss_kib();
    for i in 1000..21000 {
        send(&mut s, &mut buffer, i);
    }
    let after = daemon.rss_kib();
    println!("RSS {before} KiB before, {after} KiB after 20,000 distinct 4 KB Origins");
    assert!(
        after < before + 4 * 1024,
        "20,000 distinct 4 KB Origins grew the daemon from {before} to {after} KiB"
    );
}

#[test]
fn f4_one_client_cannot_take_every_ticket() {
    let daemon = Daemon::start("f4", "");
    let ticket = |token: &str, origin: Option<&str>| {
        let auth = format!("Bearer {token}");
        let mut headers = vec![("Authorization", auth.as_str())];
        if let Some(o) = origin {
            headers.push(("Origin", o));
        }
        daemon.request("POST", "/v1/events/ticket", &headers, "").0
    };
    let greedy: Vec<u16> = (0..60).map(|_| ticket(HELPDESK, None)).collect();
    assert!(
        greedy.contains(&429),
        "the greedy client is capped: {greedy:?}"
    );
    assert_eq!(
        ticket(TOKEN, Some(ORIGIN)),
        201,
        "the kiosk page still gets its ticket"
    );
}

#[test]
fn f5_a_flood_of_idle_connections_leaves_room_for_a_real_request() {
    // The test opens 2,000 connections; give this process room for them.
    let wanted = libc::rlimit {
        rlim_cur: 8192,
        rlim_max: 8192,
    };
    // SAFETY: plain system call on a local struct.
    let raised = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) } == 0;
    assert!(raised, "cannot raise this test's descriptor limit to 8192");
    let daemon = Daemon::start_limited("f5", "", 1024);
    // A keep-alive connection that did one request and then idles.
    let mut keep_alive = TcpStream::connect(("127.0.0.1", daemon.port)).expect("connect");
    write!(
        keep_alive,
        "GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {TOKEN}\r\n\r\n",
        daemon.port
    )
    .expect("send");
    let mut first = [0u8; 1024];
    assert!(keep_alive.read(&mut first).expect("answer") > 0);
    let mut flood = Vec::with_capacity(2000);
    for n in 0..2000 {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", daemon.port)) else {
            continue;
        };
        if n % 2 == 1 {
            // Half-sent headers.
            let _ = write!(
                s,
                "GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n",
                daemon.port
            );
        }
        flood.push(s);
    }
    assert!(
        flood.len() >= 2000,
        "only {} connections opened",
        flood.len()
    );
    let started = Instant::now();
    let (status, body) = daemon.get(
        "/v1/health",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
    );
    let took = started.elapsed();
    println!(
        "a valid request answered in {took:?} during a flood of {} connections",
        flood.len()
    );
    assert_eq!(status, 200, "{body}");
    // Not held behind the flood: well inside the 10 s header timeout and the 30 s idle reaper
    // that would free a place otherwise. (Not 1 s: when the machine is busy, the listen backlog
    // can be full for a moment and the kernel resends the SYN after exactly 1 s; a CI run saw
    // 1.017 s that way. Typical answers take 15 ms.)
    assert!(took < Duration::from_secs(5), "answered in {took:?}");
    // The idle keep-alive connection was among those closed to make room.
    keep_alive
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut rest = [0u8; 64];
    assert_eq!(
        keep_alive.read(&mut rest).map_err(|e| e.kind()),
        Ok(0),
        "closed by the daemon"
    );
    let mut closed = 0;
    for s in flood.iter_mut().take(200) {
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        if matches!(s.read(&mut rest), Ok(0)) {
            closed += 1;
        }
    }
    assert!(
        closed > 100,
        "the oldest idle and half-sent connections were closed ({closed}/200)"
    );
    drop(flood);
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
}

#[test]
fn f6_the_generated_token_never_reuses_or_follows_a_file() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = std::env::temp_dir().join(format!("cardbridge-f6-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let victim = dir.join("leak.txt");
    std::fs::write(&victim, "precious").expect("victim");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::os::unix::fs::symlink(&victim, state.join("api-token")).expect("symlink");
    let port = hw_tests::rig::free_port().expect("port");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[api]\nlisten = [\"127.0.0.1:{port}\"]\n",
            state.display()
        ),
    )
    .expect("config");
    let mut child = std::process::Command::new(hw_tests::rig::cardbridge_bin())
        .args(["run", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    let token_file = state.join("api-token");
    let until = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < until, "the daemon did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
    let meta = std::fs::symlink_metadata(&token_file).expect("token file");
    assert!(meta.is_file(), "the symlink was replaced, not followed");
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(&token_file)
            .expect("token")
            .trim()
            .len(),
        64
    );
    let state_mode = std::fs::metadata(&state).expect("state").mode() & 0o777;
    assert_eq!(state_mode, 0o700, "the state directory is made private");
    let db_mode = std::fs::metadata(state.join("cardbridge.db"))
        .expect("db")
        .mode()
        & 0o777;
    assert_eq!(db_mode, 0o600, "the database is private whatever the umask");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn http_semantics_from_the_notes() {
    let daemon = Daemon::start("semantics", "");
    let port = daemon.port;
    let lower = format!("bearer {TOKEN}");
    assert_eq!(
        daemon.get("/v1/health", &[("Authorization", &lower)]).0,
        200,
        "scheme case"
    );
    let duplicate = format!(
        "GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHost: evil.example\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    let answer = raw(&daemon, &duplicate);
    assert_eq!(status_of(&answer), 400, "{answer}");
    let absolute = format!(
        "GET http://evil.example:{port}/v1/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(status_of(&raw(&daemon, &absolute)), 421);
    // A refusal is readable by a page of an allowed origin…
    let refused = format!(
        "GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {ORIGIN}\r\nConnection: close\r\n\r\n"
    );
    let answer = raw(&daemon, &refused).to_ascii_lowercase();
    assert!(
        answer.contains(&format!("access-control-allow-origin: {ORIGIN}")),
        "{answer}"
    );
    // …and Chrome's Private Network Access preflight is answered for it.
    let preflight = format!(
        "OPTIONS /v1/events/ticket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {ORIGIN}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Private-Network: true\r\nConnection: close\r\n\r\n"
    );
    let answer = raw(&daemon, &preflight).to_ascii_lowercase();
    assert!(
        answer.contains("access-control-allow-private-network: true"),
        "{answer}"
    );
    // Every error is JSON: 405, 413, the invalid UTF-8 path, 414.
    let auth = format!("Bearer {ADMIN}");
    let (status, body) = daemon.request("DELETE", "/v1/health", &[("Authorization", &auth)], "");
    assert_eq!(status, 405);
    assert!(body.contains("\"method_not_allowed\""), "{body}");
    let big = "x".repeat(70 * 1024);
    let (status, body) = daemon.request(
        "POST",
        "/v1/revocations",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Idempotency-Key", "k"),
        ],
        &big,
    );
    assert_eq!(status, 413);
    assert!(body.contains("\"payload_too_large\""), "{body}");
    let (status, body) = daemon.get("/v1/cards/%FF%FE", &[("Authorization", &auth)]);
    assert_eq!(status, 400);
    assert!(body.contains("\"error\""), "{body}");
    let long = format!("/v1/cards/{}", "A".repeat(9000));
    let (status, body) = daemon.get(&long, &[("Authorization", &auth)]);
    assert_eq!(status, 414);
    assert!(body.contains("\"uri_too_long\""), "{body}");
    // Bidirectional overrides in a comment are refused (a dry run needs no card for that).
    let spoof = serde_json::json!({"card_id": "00112233445566778899AABBCCDDEEFF", "target": "certificates",
        "reason": "superseded", "comment": "lost \u{202E}eulav\u{202C} card", "dry_run": true});
    let (status, body) = daemon.request(
        "POST",
        "/v1/revocations",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("Idempotency-Key", "bidi"),
        ],
        &spoof.to_string(),
    );
    assert_eq!(status, 400, "{body}");
    // Refusals leave a trace: counted by code.
    let _ = daemon.get("/v1/health", &[("Authorization", "Bearer wrong")]);
    let (_, metrics) = daemon.get("/metrics", &[("Authorization", &auth)]);
    assert!(
        metrics.contains("cardbridge_http_refusals_total{code=\"bad_token\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cardbridge_http_refusals_total{code=\"duplicate_host\"} 1"),
        "{metrics}"
    );
    assert!(
        daemon.log().contains("local API call refused"),
        "{}",
        daemon.log()
    );
}

/// `cardbridge run` with `config`, which must fail to start; returns what it said.
fn run_must_fail(config: &std::path::Path) -> String {
    let config = config.display().to_string();
    let out = common::run_cardbridge(&["run", "--config", &config], &[], Duration::from_secs(10));
    assert!(!out.status.success(), "the daemon started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_unix_socket_is_never_taken_over_nor_a_file_deleted() {
    let dir = std::env::temp_dir().join(format!("cardbridge-socket-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("api.sock");
    let api = format!("unix_socket = \"{}\"\n", socket.display());
    let first = Daemon::start_with("socket-first", &api, "");
    // A second daemon (on another TCP port) with the same socket refuses to start, and the
    // first one stays reachable.
    let port = hw_tests::rig::free_port().expect("port");
    let second = dir.join("second.toml");
    std::fs::write(
        &second,
        format!(
            "state_dir = \"{}\"\n[api]\nlisten = [\"127.0.0.1:{port}\"]\n{api}",
            dir.join("state2").display()
        ),
    )
    .expect("config");
    let said = run_must_fail(&second);
    assert!(
        said.contains("another cardbridge daemon is running"),
        "{said}"
    );
    // The socket never echoes an Origin (no browser reaches it).
    let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("the first still answers");
    write!(s, "GET /v1/health HTTP/1.1\r\nHost: localhost\r\nOrigin: https://evil.example\r\nConnection: close\r\n\r\n").expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("answer");
    assert!(status_of(&answer) > 0, "{answer}");
    assert!(
        !answer
            .to_ascii_lowercase()
            .contains("access-control-allow-origin"),
        "{answer}"
    );
    drop(first);
    // A regular file at the path is reported, not deleted.
    std::fs::write(&socket, "precious data").expect("file");
    let said = run_must_fail(&second);
    assert!(said.contains("something other than a socket"), "{said}");
    assert_eq!(
        std::fs::read_to_string(&socket).expect("kept"),
        "precious data"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
