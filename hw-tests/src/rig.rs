//! The test rig: a real pcscd with vpcd reader slots of its own, shared by all tests.
//!
//! The rig writes a reader configuration with one vpcd entry, as Debian's `vsmartcard-vpcd`
//! package does (two slots, `Virtual PCD 00 00` on port 35963 and `Virtual PCD 00 01` on 35964),
//! and starts `pcscd --foreground --config DIR`. Several vpcd entries in one pcscd do not work
//! (vpcd 0.8 mixes up their slots: a card in one shows up in all, and powering it fails), so the
//! rig has two slots. Only one pcscd can run on a machine, so:
//! - if a pcscd is already running with the rig's readers, it is reused;
//! - if a pcscd without them is running, the rig fails loudly and says how to stop it;
//! - a pcscd the rig started keeps running after the tests (the next test binary reuses it).
//!
//! Tests lease reader slots from a pool, so they can run in parallel; a test that restarts pcscd
//! takes the rig exclusively.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Condvar, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

/// Reader slots the rig provides.
pub const SLOTS: usize = 2;
/// vpcd's default port; the rig's slots use `BASE_PORT..BASE_PORT + SLOTS`.
pub const BASE_PORT: u16 = 35963;
const CONFIG_DIR: &str = "/tmp/cardbridge-rig/reader.conf.d";
const VPCD_DRIVERS: [&str; 2] = [
    "/usr/lib/pcsc/drivers/serial/libifdvpcd.so",
    "/usr/lib64/pcsc/drivers/serial/libifdvpcd.so",
];

/// One leased reader slot: the vpcd port a virtual card connects to and the reader's name.
pub struct Slot {
    pub port: u16,
    pub reader: String,
    index: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let pool = &rig_static().pool;
        let mut free = pool.0.lock().unwrap_or_else(|p| p.into_inner());
        free.push(self.index);
        pool.1.notify_one();
    }
}

pub struct Rig {
    pool: (Mutex<Vec<usize>>, Condvar),
    exclusive: RwLock<()>,
}

fn rig_static() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| Rig {
        pool: (Mutex::new((0..SLOTS).rev().collect()), Condvar::new()),
        exclusive: RwLock::new(()),
    })
}

/// The reader name pcscd gives slot `index`.
pub fn reader_name(index: usize) -> String {
    format!("Virtual PCD 00 {index:02}")
}

impl Rig {
    /// The rig, with pcscd running and its readers visible. Panics with instructions when that
    /// cannot be arranged: end-to-end tests must never be skipped silently.
    pub fn get() -> &'static Rig {
        static READY: OnceLock<Result<(), String>> = OnceLock::new();
        let ready = READY.get_or_init(|| ensure_pcscd().map_err(|e| format!("{e:#}")));
        if let Err(e) = ready {
            panic!("the test rig cannot run: {e}");
        }
        rig_static()
    }

    /// Shared use of pcscd (most tests).
    pub fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.exclusive.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Sole use of pcscd, for a test that stops and restarts it.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.exclusive.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Leases a free reader slot, waiting for one if all are in use.
    pub fn slot(&self) -> Slot {
        let mut free = self.pool.0.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(index) = free.pop() {
                return Slot {
                    port: BASE_PORT + index as u16,
                    reader: reader_name(index),
                    index,
                };
            }
            free = self.pool.1.wait(free).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Kills pcscd with SIGKILL, and starts it again after `down` has passed.
    pub fn kill_pcscd(&self) -> Result<()> {
        let pid = running_pcscd().context("pcscd is not running")?;
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -9 {pid} failed");
        }
        if let Some(mut child) = CHILD.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = child.wait();
        }
        let until = Instant::now() + Duration::from_secs(5);
        while running_pcscd().is_some() {
            if Instant::now() > until {
                bail!("pcscd {pid} did not exit after SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts pcscd again after [`Rig::kill_pcscd`].
    pub fn start_pcscd(&self) -> Result<()> {
        start_pcscd()
    }
}

/// Waits until pcscd reports `reader` with (or without) a card, for at most 10 s.
pub fn wait_for_card(reader: &str, present: bool) -> Result<()> {
    let ctx = pcsc::Context::establish(pcsc::Scope::User).context("pcscd is not reachable")?;
    let mut states = [pcsc::ReaderState::new(
        CString::new(reader)?,
        pcsc::State::UNAWARE,
    )];
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = ctx.get_status_change(Duration::from_millis(200), &mut states);
        if states[0].event_state().contains(pcsc::State::PRESENT) == present {
            return Ok(());
        }
        if Instant::now() > until {
            let change = if present { "appear in" } else { "leave" };
            bail!("pcscd did not see the card {change} {reader} within 10 s");
        }
        states[0].sync_current_state();
    }
}

/// Puts a card built from `spec` into `slot` once pcscd shows the slot empty (it polls vpcd, so
/// it may still show the previous card), and waits until pcscd sees the new one.
pub fn insert_card(spec: crate::vcard::CardSpec, slot: &Slot) -> Result<crate::vpcd::Inserted> {
    insert_virtual(crate::vcard::VirtualCard::new(spec)?, slot)
}

/// [`insert_card`] for a card already built, whose truth the caller has used (e.g. to give the
/// simulator its record before the daemon can look the card up).
pub fn insert_virtual(
    card: crate::vcard::VirtualCard,
    slot: &Slot,
) -> Result<crate::vpcd::Inserted> {
    wait_for_card(&slot.reader, false)?;
    let inserted = crate::vpcd::Inserted::insert(card, slot.port, false)?;
    wait_for_card(&slot.reader, true)?;
    Ok(inserted)
}

/// The position of `reader` in pcscd's list (OpenSC's tools take readers by index).
pub fn reader_index(reader: &str) -> Result<usize> {
    let ctx = pcsc::Context::establish(pcsc::Scope::User).context("pcscd is not reachable")?;
    ctx.list_readers_owned()?
        .iter()
        .position(|r| r.to_string_lossy() == reader)
        .with_context(|| format!("reader {reader} is not listed"))
}

/// A loopback port nothing listens on right now (the OS picks it; it is released at once, so
/// a daemon or a simulator started next can take it).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Path of the cardbridge binary built for these tests (`target/<profile>/cardbridge`).
pub fn cardbridge_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // Test executables live in target/<profile>/deps, binaries in target/<profile>.
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("cardbridge");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (`cargo build --workspace`, which `cargo test --workspace` does)",
        bin.display()
    );
    bin
}

fn ensure_pcscd() -> Result<()> {
    for tool in ["pcscd"] {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            bail!("`{tool}` is not installed: run `sudo apt-get install pcscd vsmartcard-vpcd` (or `bash .ci/run`)");
        }
    }
    if !VPCD_DRIVERS.iter().any(|d| Path::new(d).exists()) {
        bail!(
            "the vpcd reader driver is not installed: run `sudo apt-get install vsmartcard-vpcd`"
        );
    }
    if running_pcscd().is_some() {
        if rig_readers_visible()? {
            return Ok(());
        }
        bail!(
            "a pcscd without the rig's virtual readers is running; stop it \
             (`sudo systemctl stop pcscd.socket pcscd.service; sudo pkill pcscd`) and run the tests again"
        );
    }
    start_pcscd()
}

fn write_config() -> Result<()> {
    let driver = VPCD_DRIVERS
        .iter()
        .find(|d| Path::new(d).exists())
        .context("vpcd driver not found")?;
    // Start from an empty folder: a stale entry on the same port would break the rig's readers.
    let _ = std::fs::remove_dir_all(CONFIG_DIR);
    std::fs::create_dir_all(CONFIG_DIR)?;
    let text = format!(
        "FRIENDLYNAME \"Virtual PCD\"\nDEVICENAME /dev/null:{BASE_PORT}\nLIBPATH {driver}\nCHANNELID {BASE_PORT}\n"
    );
    std::fs::write(Path::new(CONFIG_DIR).join("vpcd"), text)?;
    Ok(())
}

/// The pcscd this process started, kept so that it can be reaped after a kill.
static CHILD: Mutex<Option<Child>> = Mutex::new(None);

fn start_pcscd() -> Result<()> {
    if !is_root() {
        bail!("starting pcscd needs root: run the tests as root (CI does), or start the rig's pcscd yourself with `sudo pcscd --config {CONFIG_DIR}` after a first run wrote it");
    }
    write_config()?;
    // A pcscd killed with SIGKILL leaves its socket and pid file behind, and a new one refuses
    // to start while they exist.
    if running_pcscd().is_none() {
        let _ = std::fs::remove_file("/run/pcscd/pcscd.comm");
        let _ = std::fs::remove_file("/run/pcscd/pcscd.pid");
    }
    let log = std::fs::File::create("/tmp/cardbridge-rig/pcscd.log")?;
    let child = Command::new("pcscd")
        .args(["--foreground", "--config", CONFIG_DIR])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("cannot start pcscd")?;
    *CHILD.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if rig_readers_visible().unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("pcscd started but the rig's readers did not appear within 10 s; see /tmp/cardbridge-rig/pcscd.log");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rig_readers_visible() -> Result<bool> {
    let Ok(ctx) = pcsc::Context::establish(pcsc::Scope::User) else {
        return Ok(false);
    };
    let names = ctx.list_readers_owned().unwrap_or_default();
    Ok((0..SLOTS).all(|i| names.iter().any(|n| n.to_string_lossy() == reader_name(i))))
}

/// The pid of the running pcscd, from its pid file, if that process is alive.
fn running_pcscd() -> Option<u32> {
    // pcscd writes the pid followed by a newline and a NUL byte.
    let text = std::fs::read_to_string("/run/pcscd/pcscd.pid").ok()?;
    let pid: u32 = text
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // A killed child we spawned stays a zombie until reaped; it is not running.
    let state = stat.rsplit(')').next()?.split_whitespace().next()?;
    (state != "Z").then_some(pid)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}
