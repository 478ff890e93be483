//! cardbridge as a system service: the unit passes `systemd-analyze verify` and scores well in
//! `systemd-analyze security`, the daemon speaks sd_notify to a `NOTIFY_SOCKET` this test owns
//! (READY, STATUS, WATCHDOG, and no WATCHDOG once the monitor is stuck), and the install script
//! puts every file in place under a staging root, twice without harm.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hw_tests::rig::{cardbridge_bin, Rig};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn temp(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("cardbridge-service-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[test]
fn the_unit_file_verifies_and_is_hardened() {
    // verify checks that ExecStart exists: point it at the binary under test.
    let dir = temp("unit");
    let unit = std::fs::read_to_string(repo().join("service/cardbridge.service")).expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/cardbridge run"));
    let local = unit.replace("/usr/bin/cardbridge", &cardbridge_bin().to_string_lossy());
    let path = dir.join("cardbridge.service");
    std::fs::write(&path, local).expect("unit copy");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(&path)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("exposure level for cardbridge.service:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    assert!(exposure <= 2.5, "exposure {exposure}:\n{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cardbridge run` under a fake systemd: our datagram socket as NOTIFY_SOCKET, a 500 ms
/// watchdog, WATCHDOG_PID set to the daemon's own pid (by `exec` from a shell).
struct Notified {
    child: Child,
    socket: UnixDatagram,
    started: Instant,
    dir: PathBuf,
}

impl Notified {
    fn start(name: &str, stall_ms: Option<u64>) -> Notified {
        Notified::start_with(name, stall_ms, "", &[])
    }

    /// `extra` is appended to the configuration, `env` set for the daemon.
    fn start_with(
        name: &str,
        stall_ms: Option<u64>,
        extra: &str,
        env: &[(&str, &str)],
    ) -> Notified {
        let dir = temp(name);
        let socket_path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let port = hw_tests::rig::free_port().expect("free port");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\n[api]\nlisten = [\"127.0.0.1:{port}\"]\n{extra}",
                dir.join("state").display()
            ),
        )
        .expect("config");
        let mut command = Command::new("sh");
        command
            .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\""])
            .arg(cardbridge_bin())
            .arg(&config)
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "500000")
            .env_remove("CARDBRIDGE_TEST_STALL_MONITOR_MS")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(ms) = stall_ms {
            command.env("CARDBRIDGE_TEST_STALL_MONITOR_MS", ms.to_string());
        }
        command.envs(env.iter().copied());
        let started = Instant::now();
        let child = command.spawn().expect("start cardbridge run");
        Notified {
            child,
            socket,
            started,
            dir,
        }
    }

    /// Every datagram until `until` (from the start), with when it came.
    fn collect(&self, until: Duration) -> Vec<(Duration, String)> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while self.started.elapsed() < until {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                for line in text.lines() {
                    got.push((self.started.elapsed(), line.to_string()));
                }
            }
        }
        got
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_daemon_notifies_ready_status_and_watchdog() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let mut daemon = Notified::start("notify", None);
    let got = daemon.collect(Duration::from_secs(3));
    let first = |what: &str| got.iter().position(|(_, l)| l.starts_with(what));
    let ready = first("READY=1").unwrap_or_else(|| panic!("no READY=1: {got:?}"));
    let watchdog = first("WATCHDOG=1").unwrap_or_else(|| panic!("no WATCHDOG=1: {got:?}"));
    assert!(ready < watchdog, "{got:?}");
    // The rig's pcscd shows its two virtual readers.
    assert!(
        got.iter()
            .any(|(_, l)| l.starts_with("STATUS=") && l.contains("readers")),
        "{got:?}"
    );
    let pings = got.iter().filter(|(_, l)| l == "WATCHDOG=1").count();
    assert!(pings >= 4, "a ping every 250 ms: {got:?}");
    // SIGTERM: the daemon says it is stopping, then exits.
    let _ = Command::new("kill")
        .arg(daemon.child.id().to_string())
        .status();
    let rest = daemon.collect(Duration::from_secs(5));
    assert!(rest.iter().any(|(_, l)| l == "STOPPING=1"), "{rest:?}");
    let status = daemon.child.wait().expect("exit");
    assert!(status.success(), "{status}");
}

#[test]
fn without_pcscd_the_daemon_is_ready_and_says_it_waits() {
    // pcsc-lite's client finds pcscd through this variable: point it at nothing.
    let dir = temp("no-pcscd");
    let nowhere = dir.join("no-pcscd.comm");
    let daemon = Notified::start_with(
        "no-pcscd",
        None,
        "",
        &[("PCSCLITE_CSOCK_NAME", &nowhere.to_string_lossy())],
    );
    let got = daemon.collect(Duration::from_secs(3));
    assert!(got.iter().any(|(_, l)| l == "READY=1"), "{got:?}");
    assert!(
        got.iter().any(|(_, l)| l == "STATUS=waiting for pcscd"),
        "{got:?}"
    );
    assert!(got.iter().any(|(_, l)| l == "WATCHDOG=1"), "{got:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreachable_cm_server_shows_in_the_status() {
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let card = match hw_tests::rig::insert_card(hw_tests::vcard::CardSpec::piv_four_certs(), &slot)
    {
        Ok(card) => card,
        Err(e) => panic!("cannot insert the virtual card: {e:#}"),
    };
    // Nothing listens on this port.
    let port = hw_tests::rig::free_port().expect("free port");
    let daemon = Notified::start_with(
        "cm-down",
        None,
        &format!(
            "[cm]\nbase_url = \"http://127.0.0.1:{port}/CertificateManagement/\"\nretries = 0\n"
        ),
        &[],
    );
    let got = daemon.collect(Duration::from_secs(5));
    assert!(
        got.iter()
            .any(|(_, l)| l.starts_with("STATUS=") && l.ends_with("; CM unreachable")),
        "{got:?}"
    );
    card.remove();
}

#[test]
fn watchdog_pings_stop_when_the_monitor_is_stuck() {
    let rig = Rig::get();
    let _shared = rig.shared();
    // The monitor stops beating 2.5 s after it starts; it counts as stuck 3 s later.
    let daemon = Notified::start("stuck", Some(2_500));
    let got = daemon.collect(Duration::from_secs(8));
    let pings: Vec<Duration> = got
        .iter()
        .filter(|(_, l)| l == "WATCHDOG=1")
        .map(|(at, _)| *at)
        .collect();
    assert!(
        pings.iter().any(|at| *at < Duration::from_millis(2_500)),
        "pings while the monitor was alive: {got:?}"
    );
    let last = pings.last().copied().unwrap_or_default();
    assert!(
        last < Duration::from_millis(6_500),
        "pings went on after the monitor got stuck (last at {last:?}): {got:?}"
    );
}

#[test]
fn the_install_script_puts_every_file_in_place_and_can_run_twice() {
    let root = temp("install");
    let run = || {
        let out = Command::new(repo().join("service/install"))
            .arg("--binary")
            .arg(cardbridge_bin())
            .env("DESTDIR", &root)
            .output()
            .expect("service/install");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run();
    let expected = [
        ("usr/bin/cardbridge", 0o755),
        ("usr/lib/systemd/system/cardbridge.service", 0o644),
        ("usr/lib/sysusers.d/cardbridge.conf", 0o644),
        ("usr/lib/udev/rules.d/70-cardbridge.rules", 0o644),
        ("usr/share/polkit-1/rules.d/50-cardbridge-pcsc.rules", 0o644),
        (
            "etc/polkit-1/localauthority/50-local.d/50-cardbridge-pcsc.pkla",
            0o644,
        ),
        ("etc/cardbridge/config.toml", 0o640),
        ("usr/share/doc/cardbridge/config.example.toml", 0o644),
        ("usr/share/doc/cardbridge/README.md", 0o644),
    ];
    for (path, mode) in expected {
        let meta = std::fs::metadata(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{path}");
    }
    // The installed configuration is valid as it is.
    let out = Command::new(cardbridge_bin())
        .args(["check-config", "--config"])
        .arg(root.join("etc/cardbridge/config.toml"))
        .output()
        .expect("check-config");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second run keeps the administrator's configuration.
    let config = root.join("etc/cardbridge/config.toml");
    std::fs::write(&config, "log_level = \"debug\"\n").expect("edit config");
    run();
    assert_eq!(
        std::fs::read_to_string(&config).expect("config"),
        "log_level = \"debug\"\n"
    );
    let _ = std::fs::remove_dir_all(&root);
}
