//! `cardbridge run` as the end-to-end tests drive it: a configuration with three API clients, a
//! free loopback port, raw HTTP requests (so tests control every header), the event stream, and
//! stopping with SIGTERM (graceful) or SIGKILL (a crash) and starting again on the same state.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hw_tests::rig::cardbridge_bin;

use super::eventually;
use sha2::{Digest, Sha256};

/// A read-only client whose pages may come from [`ORIGIN`].
pub const TOKEN: &str = "kiosk-token-0123456789";
/// A client that may also ask for a sync.
pub const HELPDESK: &str = "helpdesk-token-9876543210";
/// A client with every scope, revocation included.
pub const ADMIN: &str = "admin-token-5555555555";
pub const ORIGIN: &str = "https://kiosk.contoso.com";

pub struct Daemon {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// Extra environment of the daemon (e.g. `KRB5_CONFIG`), kept for restarts.
    env: Vec<(String, String)>,
    /// Its descriptor limit (`RLIMIT_NOFILE`), when a test sets one.
    nofile: Option<u64>,
}

impl Daemon {
    pub fn start(name: &str, rest: &str) -> Daemon {
        Daemon::start_with(name, "", rest)
    }

    /// `api` goes into the `[api]` table, `rest` (e.g. `[cm]`) at the end of the file.
    pub fn start_with(name: &str, api: &str, rest: &str) -> Daemon {
        Daemon::start_env(name, api, rest, Vec::new())
    }

    /// A daemon whose descriptor limit (`RLIMIT_NOFILE`) is `nofile`, as `LimitNOFILE=` sets it.
    pub fn start_limited(name: &str, rest: &str, nofile: u64) -> Daemon {
        Daemon::start_full(name, "", rest, Vec::new(), Some(nofile))
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// As [`Daemon::start_with`], with extra environment variables for the daemon.
    pub fn start_env(name: &str, api: &str, rest: &str, env: Vec<(String, String)>) -> Daemon {
        Daemon::start_full(name, api, rest, env, None)
    }

    fn start_full(
        name: &str,
        api: &str,
        rest: &str,
        env: Vec<(String, String)>,
        nofile: Option<u64>,
    ) -> Daemon {
        let dir =
            std::env::temp_dir().join(format!("cardbridge-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let hash = |t: &str| hex::encode(Sha256::digest(t.as_bytes()));
        let config = format!(
            "state_dir = \"{}\"\n[api]\nlisten = [\"127.0.0.1:0\"]\n{api}\
             [[api.clients]]\nname = \"kiosk\"\ntoken_sha256 = \"{}\"\nscopes = [\"read\"]\norigins = [\"{ORIGIN}\"]\n\
             [[api.clients]]\nname = \"helpdesk\"\ntoken_sha256 = \"{}\"\nscopes = [\"read\", \"sync\"]\n\
             [[api.clients]]\nname = \"admin\"\ntoken_sha256 = \"{}\"\nscopes = [\"read\", \"sync\", \"revoke\"]\n{rest}",
            dir.join("state").display(),
            hash(TOKEN),
            hash(HELPDESK),
            hash(ADMIN),
        );
        std::fs::write(dir.join("config.toml"), config).expect("config");
        let child = spawn(&dir, &env, nofile);
        let mut daemon = Daemon {
            child,
            port: 0,
            dir,
            env,
            nofile,
        };
        daemon.port = daemon.wait_listening(0);
        daemon
    }

    /// The daemon binds port 0 and logs the port it got ("API listening on …"): the
    /// `seen`+1-th such line is this start's, and it comes once the listener is bound.
    fn wait_listening(&self, seen: usize) -> u16 {
        self.logged_port("API listening on http://127.0.0.1:", seen)
    }

    /// The port in the `seen`-th log line (from 0) that contains `line` followed by the port,
    /// waiting for it: how a daemon bound to port 0 tells which port it got.
    pub fn logged_port(&self, line: &str, seen: usize) -> u16 {
        let port = eventually(line, Duration::from_secs(10), || {
            let log = self.log();
            let found = log
                .lines()
                .filter(|l| l.contains(line))
                .nth(seen)?
                .to_string();
            let after = &found[found.find(line)? + line.len()..];
            after.split('/').next()?.parse::<u16>().ok()
        });
        assert!(port != 0, "{}", self.log());
        port
    }

    /// SIGKILL: the daemon dies wherever it is, as in a crash or power cut.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the daemon again with the same configuration and state (on a new port).
    pub fn restart(&mut self) {
        let seen = self
            .log()
            .lines()
            .filter(|l| l.contains("API listening on"))
            .count();
        self.child = spawn(&self.dir, &self.env, self.nofile);
        self.port = self.wait_listening(seen);
    }

    /// `GET /v1/cards/{id}/reconciliation` as the read-only client (`None` until there is one).
    pub fn reconciliation(&self, card_id: &str) -> Option<serde_json::Value> {
        let auth = format!("Bearer {TOKEN}");
        let path = format!("/v1/cards/{card_id}/reconciliation");
        let (status, body) = self.get(&path, &[("Authorization", &auth)]);
        (status == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }

    /// Waits (at most 20 s) for a reconciliation of the card that satisfies `want`, checked
    /// after `after` (an earlier `checked_at`, or "" for any); panics naming `what`.
    pub fn wait_reconciliation(
        &self,
        card_id: &str,
        after: &str,
        what: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + Duration::from_secs(20);
        let mut last = None;
        loop {
            if let Some(r) = self.reconciliation(card_id) {
                let at = |text: &str| {
                    time::OffsetDateTime::parse(
                        text,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .ok()
                };
                let newer = after.is_empty()
                    || at(r["checked_at"].as_str().unwrap_or_default()) > at(after);
                if newer && want(&r) {
                    return r;
                }
                last = Some(r);
            }
            assert!(
                Instant::now() < until,
                "no reconciliation {what} within 20 s; last: {last:#?}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `POST /v1/cards/{id}/sync` as the helpdesk client: read and reconcile the card again.
    pub fn sync(&self, card_id: &str) {
        let auth = format!("Bearer {HELPDESK}");
        let (status, body) = self.request(
            "POST",
            &format!("/v1/cards/{card_id}/sync"),
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            "{}",
        );
        assert_eq!(status, 202, "sync: {body}");
    }

    /// What the daemon has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// A raw HTTP/1.1 GET with the given extra headers; returns the status and body.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        self.request("GET", path, headers, "")
    }

    /// A raw HTTP/1.1 request (raw, so that tests control every header, Host included).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        http(self.port, method, path, headers, body)
    }

    /// Opens the event stream (optionally resuming after `last`) as the read-only client.
    pub fn events(&self, last: Option<u64>) -> BufReader<TcpStream> {
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
        // The answer's headers come once the stream is subscribed: from then on no event is
        // missed, so this is the readiness signal (no sleep needed).
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        loop {
            line.clear();
            let n = reader.read_line(&mut line).expect("event stream headers");
            assert!(n > 0, "the event stream closed before its headers");
            if line == "\r\n" {
                return reader;
            }
        }
    }
}

/// Starts `cardbridge run`; its log goes to `daemon.log` in the test's directory.
fn spawn(dir: &std::path::Path, env: &[(String, String)], nofile: Option<u64>) -> Child {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .expect("daemon log");
    let mut command = Command::new(cardbridge_bin());
    command
        .args(["run", "--config"])
        .arg(dir.join("config.toml"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(limit) = nofile {
        // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(move || {
                let rlimit = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    command.spawn().expect("start cardbridge run")
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
pub fn next_event(
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

/// A raw HTTP/1.1 request to a port of loopback (raw, so that tests control every header, Host
/// included); returns the status and body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    status_and_body(&http_raw(port, method, path, headers, body))
}

/// The same request; returns the whole answer as it came, status line and headers included.
pub fn http_raw(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    s.write_all(request.as_bytes()).expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read");
    answer
}

/// Reads a whole `Connection: close` HTTP/1.1 answer: its status and body.
pub fn read_answer(stream: &mut impl std::io::Read) -> (u16, String) {
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    status_and_body(&answer)
}

fn status_and_body(answer: &str) -> (u16, String) {
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
