//! A real MIT Kerberos KDC on loopback, for the Negotiate tests.
//!
//! Debian's `krb5-kdc` and `krb5-admin-server` (`krb5kdc`, `kdb5_util`, `kadmin.local`), run as
//! the test's user in a temporary directory with a realm of its own (`krb5.conf` for everyone,
//! `kdc.conf` for what only the KDC reads), principals and keytabs are made with `kadmin.local`.
//! Clients are told to use TCP (`udp_preference_limit = 1`). The KDC is killed when the test
//! process ends, however it ends: a thread that lives as long as the process starts it with
//! `PR_SET_PDEATHSIG`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

pub const REALM: &str = "CARDBRIDGE.TEST";
/// The service principal of the simulated MIM CM site.
pub const CM_SPN: &str = "HTTP/cm.cardbridge.test";

pub struct Kdc {
    pub dir: PathBuf,
    pub port: u16,
    child: Mutex<Option<Child>>,
}

impl Kdc {
    /// Creates the realm's database and starts the KDC; fails with the missing tool named.
    pub fn start(name: &str) -> Result<Kdc> {
        for tool in ["krb5kdc", "kdb5_util", "kadmin.local"] {
            if which(tool).is_none() {
                bail!("{tool} is not installed: run hw-tests/install-deps (krb5-kdc, krb5-admin-server, krb5-user)");
            }
        }
        let dir =
            std::env::temp_dir().join(format!("cardbridge-kdc-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let port = crate::rig::free_port()?;
        let d = dir.display();
        std::fs::write(
            dir.join("krb5.conf"),
            format!(
                "[libdefaults]\n default_realm = {REALM}\n dns_lookup_kdc = false\n dns_lookup_realm = false\n\
                 rdns = false\n dns_canonicalize_hostname = false\n udp_preference_limit = 1\n\
                 [realms]\n {REALM} = {{\n  kdc = 127.0.0.1:{port}\n  database_name = {d}/principal\n\
                 key_stash_file = {d}/stash\n  acl_file = {d}/kadm5.acl\n  max_life = 10h\n }}\n\
                 [domain_realm]\n cardbridge.test = {REALM}\n .cardbridge.test = {REALM}\n"
            ),
        )?;
        // The KDC reads both files; what only it needs goes in the second, once.
        std::fs::write(
            dir.join("kdc.conf"),
            format!(
                "[kdcdefaults]\n kdc_listen = 127.0.0.1:{port}\n kdc_tcp_listen = 127.0.0.1:{port}\n\
                 [logging]\n kdc = FILE:{d}/kdc.log\n"
            ),
        )?;
        std::fs::write(dir.join("kadm5.acl"), "")?;
        let kdc = Kdc {
            dir,
            port,
            child: Mutex::new(None),
        };
        kdc.tool(
            "kdb5_util",
            &["create", "-s", "-r", REALM, "-P", "cardbridge-master"],
        )?;
        kdc.restart()?;
        Ok(kdc)
    }

    pub fn krb5_conf(&self) -> PathBuf {
        self.dir.join("krb5.conf")
    }

    /// What a Kerberos client or acceptor of this realm needs in its environment.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("KRB5_CONFIG".into(), self.krb5_conf().display().to_string()),
            (
                "KRB5_KDC_PROFILE".into(),
                self.dir.join("kdc.conf").display().to_string(),
            ),
            ("KRB5RCACHENAME".into(), "none:".into()),
        ]
    }

    /// `kadmin.local` with one query.
    pub fn kadmin(&self, query: &str) -> Result<String> {
        self.tool("kadmin.local", &["-r", REALM, "-q", query])
    }

    /// A principal with a random key; `max_life` like `"1 minute"` limits its tickets.
    pub fn add_principal(&self, name: &str, max_life: Option<&str>) -> Result<()> {
        let life = max_life
            .map(|l| format!("-maxlife \"{l}\" "))
            .unwrap_or_default();
        self.kadmin(&format!("addprinc -randkey {life}{name}"))?;
        Ok(())
    }

    /// Writes the principal's current keys to `keytab` (mode 0600).
    pub fn keytab(&self, principal: &str, keytab: &Path) -> Result<()> {
        self.kadmin(&format!("ktadd -k {} {principal}", keytab.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(keytab, std::fs::Permissions::from_mode(0o600))?;
        Ok(())
    }

    /// Gives the principal new keys, as a password change does: keytabs made before are stale.
    pub fn rekey(&self, principal: &str) -> Result<()> {
        self.kadmin(&format!("cpw -randkey {principal}"))?;
        Ok(())
    }

    /// Stops the KDC (the network path to it is gone).
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the KDC (again) and waits until it accepts connections.
    pub fn restart(&self) -> Result<()> {
        self.stop();
        let mut command = Command::new(which("krb5kdc").unwrap_or_else(|| "krb5kdc".into()));
        command
            .args(["-n", "-r", REALM, "-P"])
            .arg(self.dir.join("kdc.pid"))
            .envs(self.env())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = spawn_for_process_life(command).context("cannot start krb5kdc")?;
        *self.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > until {
                bail!(
                    "krb5kdc did not listen on 127.0.0.1:{} (see {}/kdc.log)",
                    self.port,
                    self.dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The KDC's log: one line per AS-REQ and TGS-REQ it answered.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kdc.log")).unwrap_or_default()
    }

    fn tool(&self, tool: &str, args: &[&str]) -> Result<String> {
        let out = Command::new(which(tool).unwrap_or_else(|| tool.into()))
            .args(args)
            .envs(self.env())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {tool}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("{tool} {args:?} failed: {text}");
        }
        Ok(text)
    }
}

impl Drop for Kdc {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.exists())
}

/// Spawns `command` from a thread that lives as long as the process, with the child set to be
/// killed when that thread (so the process) ends: `PR_SET_PDEATHSIG` follows the spawning
/// thread, and test threads end with their test.
fn spawn_for_process_life(command: Command) -> std::io::Result<Child> {
    type Job = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: std::sync::OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for (mut command, reply) in rx {
                use std::os::unix::process::CommandExt;
                // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
                unsafe {
                    command.pre_exec(|| {
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                        Ok(())
                    });
                }
                let _ = reply.send(command.spawn());
            }
        });
        Mutex::new(tx)
    });
    let (reply, answer) = std::sync::mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the spawner thread is gone"))?
}
