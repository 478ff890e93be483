//! The chaos and soak runs: `cardbridge run` against a real pcscd with both vpcd slots and the
//! MIM CM / SCEPman simulator (OAuth for SCEPman), under load, then the end checks of
//! `hw_tests::chaos`.
//!
//! - `chaos --seconds N`: virtual cards inserted and pulled at random (held 50 ms to 2 s, some
//!   slow enough to be pulled mid-read), pcscd and the daemon killed with SIGKILL and started
//!   again, simulator faults (latency, 500s, garbage, dropped connections) and refused tokens,
//!   stream clients coming and going, revocations submitted.
//! - `chaos --soak --minutes N [--every M]`: the same load at a steady rate with no kills, the
//!   daemon's resident memory, descriptors, threads and database size every M minutes, and the
//!   memory's slope after the first two minutes.
//!
//! It prints one line per check and exits 1 when one fails. It uses the rig alone: run nothing
//! else against pcscd meanwhile.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use cardbridge::card::cert::CertificateInfo;
use clap::Parser;
use hw_tests::chaos::{self, Insertion, Outage, Received, Submitted, Verdict};
use hw_tests::rig::{self, Rig};
use hw_tests::sim::{matching_record, scepman_certs, Fault, Fixture, Simulator};
use hw_tests::sim_auth::{OAuthApp, SimAuth};
use hw_tests::station_client::{
    http, open_stream, read_frames, revocation_status, sample, slope, unit_environment,
};
use hw_tests::vcard::{CardSpec, VirtualCard};
use hw_tests::vpcd::Inserted;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Parser)]
struct Args {
    /// Chaos: how long the load runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Soak instead of chaos: a steady load, no kills, the daemon sampled every second.
    #[arg(long)]
    soak: bool,
    /// Soak: how long, in minutes.
    #[arg(long, default_value_t = 30)]
    minutes: u64,
    /// Soak: print a sample every this many minutes (the slope uses one sample a second).
    #[arg(long, default_value_t = 1)]
    every: u64,
    /// Seed of the random choices (printed, so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
}

impl Args {
    /// How long the load runs.
    fn length(&self) -> Duration {
        Duration::from_secs(if self.soak {
            self.minutes * 60
        } else {
            self.seconds
        })
    }
}

const TOKEN: &str = "chaos-admin-token-0123456789";
const CLIENT_ID: &str = "7d1c0f3e-chaos";
const SECRET: &str = "chaos-client-secret-value";

fn now() -> f64 {
    unix_seconds(SystemTime::now())
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A card of the run: the card itself (cloned for each insertion) and its certificates'
/// thumbprints and serial numbers, for revocations.
#[derive(Clone)]
struct PoolCard {
    card: VirtualCard,
    id: String,
    certificates: Vec<(String, String)>,
}

fn pool_card(spec: CardSpec) -> Result<PoolCard> {
    let card = VirtualCard::new(spec)?;
    let id = card
        .truth
        .card_id
        .clone()
        .context("a virtual card has an id")?;
    let certificates = card
        .truth
        .certificates
        .iter()
        .filter_map(|c| {
            let der = hex::decode(&c.der).ok()?;
            let info = CertificateInfo::from_der(c.slot.clone(), String::new(), der, false);
            Some((c.thumbprint.clone(), info.serial_number?))
        })
        .collect();
    Ok(PoolCard {
        card,
        id,
        certificates,
    })
}

/// Three cards per reader: a fast PIV card, a slow one (about 30 ms per APDU, so a short hold
/// pulls it mid-read) and a GIDS card.
fn pools() -> Result<Vec<Vec<PoolCard>>> {
    (0..rig::SLOTS)
        .map(|_| {
            let mut slow = CardSpec::piv_four_certs();
            slow.faults.slow_ms = 30;
            [
                CardSpec::piv_four_certs(),
                slow,
                CardSpec::gids_two_containers(),
            ]
            .into_iter()
            .map(pool_card)
            .collect()
        })
        .collect()
}

/// `cardbridge run` with its own state directory; its log is `daemon.log` there.
struct Station {
    child: Child,
    dir: PathBuf,
    starts: usize,
}

impl Station {
    fn start(dir: &Path, sim: &Simulator) -> Result<(Station, u16)> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let secret = dir.join("scepman.secret");
        std::fs::write(&secret, SECRET)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
        // Both servers take the simulator's OAuth tokens, which it refuses now and then.
        let server = |section: &str, base_url: String| {
            format!(
                "[{section}]\nbase_url = \"{base_url}\"\ntimeout_ms = 2000\nauth = \"oauth\"\n\
                 token_url = \"{}\"\nclient_id = \"{CLIENT_ID}\"\nscope = \"api://cardbridge/.default\"\n\
                 client_secret_file = \"{}\"\n",
                sim.entra_token_url(),
                secret.display()
            )
        };
        let config = format!(
            "state_dir = \"{}\"\n[api]\nlisten = [\"127.0.0.1:0\"]\nrevocation_burst = 100\n\
             [[api.clients]]\nname = \"chaos\"\ntoken_sha256 = \"{}\"\nscopes = [\"read\", \"sync\", \"revoke\"]\n{}{}",
            dir.join("state").display(),
            hex::encode(Sha256::digest(TOKEN)),
            server("cm", sim.cm_base_url()),
            server("scepman", sim.scepman_base_url()),
        );
        std::fs::write(dir.join("config.toml"), config)?;
        let mut station = Station {
            child: spawn(dir)?,
            dir: dir.to_path_buf(),
            starts: 0,
        };
        let port = station.wait_listening()?;
        Ok((station, port))
    }

    /// The port of this start's "API listening" line, once it is logged.
    fn wait_listening(&mut self) -> Result<u16> {
        const LINE: &str = "API listening on http://127.0.0.1:";
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            let port = log
                .lines()
                .filter_map(|l| Some(&l[l.find(LINE)? + LINE.len()..]))
                .nth(self.starts)
                .and_then(|rest| rest.split('/').next()?.parse::<u16>().ok());
            if let Some(port) = port {
                self.starts += 1;
                return Ok(port);
            }
            if Instant::now() > until {
                bail!("the daemon did not start listening:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn restart(&mut self) -> Result<u16> {
        self.child = spawn(&self.dir)?;
        self.wait_listening()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Station {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let until = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
    }
}

fn spawn(dir: &Path) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))?;
    Command::new(rig::cardbridge_bin())
        .args(["run", "--config"])
        .arg(dir.join("config.toml"))
        .envs(unit_environment())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("cannot start cardbridge run")
}

/// Everything the threads share and the checks read.
struct Run {
    soak: bool,
    /// How long the load runs.
    length: Duration,
    stop: AtomicBool,
    /// Held for reading while a card goes in or out, for writing while pcscd restarts.
    pcscd: RwLock<()>,
    station: Mutex<Station>,
    /// The running daemon's API port, and its start's number (an observer stream belongs to
    /// one start). One lock for both: a stream opened on a new daemon's port is never taken for
    /// the previous daemon's.
    daemon: Mutex<(u16, u64)>,
    sim: Simulator,
    insertions: Mutex<Vec<Insertion>>,
    outages: Mutex<Vec<Outage>>,
    /// One stream per daemon start that stayed connected from the start.
    observed: Mutex<Vec<Vec<Received>>>,
    /// The ids each short-lived stream client received.
    churned: Mutex<Vec<Vec<u64>>>,
    /// Revocation ids and the serial number each revokes.
    submitted: Mutex<Vec<(u64, String)>>,
    /// Cards the daemon has read at least once (it takes revocations only for those).
    read_once: Mutex<Vec<String>>,
}

impl Run {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps `ms`, in steps, returning early when the run stops.
    fn pause(&self, ms: u64) {
        let until = Instant::now() + Duration::from_millis(ms);
        while !self.stopped() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(ms.min(50)));
        }
    }

    fn port(&self) -> u16 {
        lock(&self.daemon).0
    }
}

/// One reader: cards in and out at random (chaos) or on a steady beat (soak).
fn reader_loop(run: &Run, slot: usize, pool: &[PoolCard]) -> Result<()> {
    let port = rig::BASE_PORT + slot as u16;
    while !run.stopped() {
        let card = &pool[fastrand::usize(..pool.len())];
        let (hold, gap) = if run.soak {
            (1500, 1000)
        } else {
            (fastrand::u64(50..=2000), fastrand::u64(50..=1000))
        };
        let (inserted, index) = {
            let _pcscd = run.pcscd.read().unwrap_or_else(|p| p.into_inner());
            let at = now();
            let inserted = Inserted::insert(card.card.clone(), port, true)?;
            let mut insertions = lock(&run.insertions);
            insertions.push(Insertion {
                reader: rig::reader_name(slot),
                card_id: card.id.clone(),
                inserted: at,
                seen: None,
                removed: None,
            });
            (inserted, insertions.len() - 1)
        };
        run.pause(hold);
        {
            let _pcscd = run.pcscd.read().unwrap_or_else(|p| p.into_inner());
            let seen = inserted.contacted_at().map(unix_seconds);
            inserted.remove();
            let mut insertions = lock(&run.insertions);
            insertions[index].seen = seen;
            insertions[index].removed = Some(now());
        }
        run.pause(gap);
    }
    Ok(())
}

/// Kills pcscd or the daemon every 8 to 20 seconds, in turn.
fn disruptor(run: &Run) -> Result<()> {
    let rig = Rig::get();
    let mut pcscd_next = true;
    while !run.stopped() {
        run.pause(fastrand::u64(8000..=20_000));
        if run.stopped() {
            break;
        }
        let from = now();
        if pcscd_next {
            let _pcscd = run.pcscd.write().unwrap_or_else(|p| p.into_inner());
            rig.kill_pcscd()?;
            std::thread::sleep(Duration::from_millis(fastrand::u64(200..=1500)));
            rig.start_pcscd()?;
        } else {
            let mut station = lock(&run.station);
            station.kill9();
            std::thread::sleep(Duration::from_millis(fastrand::u64(100..=800)));
            let port = station.restart()?;
            let mut daemon = lock(&run.daemon);
            *daemon = (port, daemon.1 + 1);
        }
        lock(&run.outages).push(Outage { from, to: now() });
        pcscd_next = !pcscd_next;
    }
    Ok(())
}

/// Simulator faults on one route at a time for 0.5 to 3 s, and every access token refused now
/// and then (as after a key rollover).
fn fault_injector(run: &Run) {
    const ROUTES: [&str; 4] = ["smartcards", "certificates", "search", "revoke"];
    let mut beat = 0u32;
    while !run.stopped() {
        run.pause(if run.soak {
            3000
        } else {
            fastrand::u64(500..=3000)
        });
        let route = ROUTES[fastrand::usize(..ROUTES.len())];
        let fault = match fastrand::u8(..4) {
            0 => Fault {
                latency_ms: fastrand::u64(200..=2500),
                ..Fault::default()
            },
            1 => Fault {
                error_500: true,
                ..Fault::default()
            },
            2 => Fault {
                garbage: true,
                ..Fault::default()
            },
            _ => Fault {
                drop: true,
                ..Fault::default()
            },
        };
        run.sim.set_fault(route, fault);
        run.pause(fastrand::u64(500..=3000));
        run.sim.set_fault(route, Fault::default());
        beat += 1;
        if beat % 5 == 0 {
            run.sim.revoke_tokens();
        }
    }
}

/// A raw HTTP/1.1 request as the chaos client, with a deadline on the answer.
/// One stream per daemon start, from its first event (`Last-Event-ID: 0`) until it dies.
fn observer(run: &Run) {
    let mut current = u64::MAX;
    while !run.stopped() {
        let (port, generation) = *lock(&run.daemon);
        let after = if generation == current {
            lock(&run.observed)
                .last()
                .and_then(|s| s.last())
                .map(|e| e.id)
        } else {
            Some(0)
        };
        let Ok(mut stream) = open_stream(port, TOKEN, after) else {
            run.pause(50);
            continue;
        };
        if generation != current {
            current = generation;
            lock(&run.observed).push(Vec::new());
        }
        read_frames(&mut stream, &|| !run.stopped(), None, |event| {
            if event.name == "card.read" {
                if let Some(id) = event.data["card_id"].as_str() {
                    let mut read = lock(&run.read_once);
                    if !read.iter().any(|r| r == id) {
                        read.push(id.to_string());
                    }
                }
            }
            if let Some(stream) = lock(&run.observed).last_mut() {
                stream.push(event);
            }
        });
    }
}

/// Stream clients that connect, listen for 0.2 to 3 s and leave.
fn churner(run: &Run) {
    while !run.stopped() {
        if let Ok(mut stream) = open_stream(run.port(), TOKEN, None) {
            let until = Instant::now() + Duration::from_millis(fastrand::u64(200..=3000));
            let mut ids = Vec::new();
            read_frames(&mut stream, &|| !run.stopped(), Some(until), |e| {
                ids.push(e.id)
            });
            lock(&run.churned).push(ids);
        }
        run.pause(fastrand::u64(100..=1000));
    }
}

/// Every 5 to 12 s (chaos), or at even intervals over the whole soak (so that the soak's load is
/// the same in its first minutes as in its last), revokes one more certificate of a card the
/// daemon has read, through SCEPman. A request that got no answer (the daemon was killed) is
/// sent again with the same Idempotency-Key until it has one, so every stored revocation is
/// known here.
fn revoker(run: &Run, pools: &[Vec<PoolCard>]) {
    let mut todo: Vec<(String, String, String)> = pools
        .iter()
        .flatten()
        .flat_map(|c| {
            c.certificates
                .iter()
                .map(|(t, s)| (c.id.clone(), t.clone(), s.clone()))
        })
        .collect();
    fastrand::shuffle(&mut todo);
    let steady = run.length.as_millis() as u64 / (todo.len() as u64 + 1);
    while !run.stopped() {
        run.pause(if run.soak {
            steady
        } else {
            fastrand::u64(5000..=12_000)
        });
        let read = lock(&run.read_once).clone();
        let Some(n) = todo.iter().position(|(card, _, _)| read.contains(card)) else {
            continue;
        };
        let (card, thumbprint, serial) = todo.remove(n);
        let key = format!("chaos-{serial}");
        let body = json!({"card_id": card, "target": "certificates", "thumbprints": [thumbprint],
            "reason": "keyCompromise", "revoker": "chaos@contoso.com"})
        .to_string();
        let headers = [
            ("Content-Type", "application/json"),
            ("Idempotency-Key", key.as_str()),
        ];
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            match http(
                run.port(),
                TOKEN,
                "POST",
                "/v1/revocations",
                &headers,
                &body,
            ) {
                Ok((202, answer)) => {
                    let id = serde_json::from_str::<Value>(&answer)
                        .ok()
                        .and_then(|v| v["id"].as_u64());
                    if let Some(id) = id {
                        lock(&run.submitted).push((id, serial));
                    }
                    break;
                }
                Ok((status, answer)) if status != 0 && status != 503 => {
                    eprintln!("chaos: revocation of {serial} refused: {status} {answer}");
                    break;
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

/// How many times a minute the soak samples the daemon for the slope: every second. With one
/// sample a minute, one momentary peak (up to 500 KiB: a read or a server answer in flight)
/// moved a ten-minute fit by up to 20 KiB/min. With six, every sample fell at the same point of
/// the load's 2.5-s insertion cycle and of the daemon's 10-s release of free pages, and a run's
/// fit differed from one over whole smaps taken beside it every 10 s (drifting through both
/// cycles) by up to 26 KiB/min. Sampled every second, each cycle is seen whole.
const SAMPLES_PER_MINUTE: u64 = 60;

/// Samples the daemon `SAMPLES_PER_MINUTE` times a minute, prints a row every `every` minutes
/// (and at the last minute), then the resident memory's least-squares slope over the samples
/// after the first two minutes (warm-up).
fn soak_sampler(run: &Run, minutes: u64, every: u64) {
    println!("minute  rss_kib  fds  threads  db_kib");
    let mut rss = Vec::new();
    let ticks = minutes * SAMPLES_PER_MINUTE;
    let print_every = every.max(1) * SAMPLES_PER_MINUTE;
    let started = Instant::now();
    for tick in 0..=ticks {
        let due = started + Duration::from_millis(tick * 60_000 / SAMPLES_PER_MINUTE);
        run.pause(due.saturating_duration_since(Instant::now()).as_millis() as u64);
        if run.stopped() {
            break;
        }
        let station = lock(&run.station);
        let now = sample(station.pid(), &station.dir.join("state"));
        drop(station);
        let minute = tick as f64 / SAMPLES_PER_MINUTE as f64;
        rss.push((minute, now.rss_kib as f64));
        if tick % print_every == 0 || tick == ticks {
            let (kib, fds, threads, db) = (now.rss_kib, now.fds, now.threads, now.state_kib);
            println!(
                "{:>6}  {kib:>7}  {fds:>3}  {threads:>7}  {db:>6}",
                tick / SAMPLES_PER_MINUTE
            );
        }
    }
    let after: Vec<(f64, f64)> = rss.into_iter().filter(|(m, _)| *m >= 2.0).collect();
    match slope(&after) {
        Some(s) => println!(
            "RSS slope after minute 2: {s:.1} KiB/min ({} samples)",
            after.len()
        ),
        None => println!("RSS slope after minute 2: too few samples"),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    fastrand::seed(seed);
    println!(
        "{} for {} s, seed {seed}",
        if args.soak { "soak" } else { "chaos" },
        args.length().as_secs()
    );
    let rig = Rig::get();
    let _alone = rig.exclusive();
    for slot in 0..rig::SLOTS {
        rig::wait_for_card(&rig::reader_name(slot), false)?;
    }
    let pools = pools()?;
    let run = start(&args, &pools)?;
    let run = Arc::new(run);
    let started = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let mut loops = Vec::new();
        for (slot, pool) in pools.iter().enumerate() {
            let run = &run;
            loops.push(scope.spawn(move || reader_loop(run, slot, pool)));
        }
        if !args.soak {
            loops.push(scope.spawn(|| disruptor(&run)));
        }
        scope.spawn(|| fault_injector(&run));
        scope.spawn(|| observer(&run));
        for _ in 0..3 {
            scope.spawn(|| churner(&run));
        }
        scope.spawn(|| revoker(&run, &pools));
        // A soak ends when its sampler has taken the last minute's sample.
        let sampler = args
            .soak
            .then(|| scope.spawn(|| soak_sampler(&run, args.minutes, args.every)));
        let over = || match &sampler {
            Some(sampler) => sampler.is_finished(),
            None => started.elapsed() >= run.length,
        };
        while !over() && !loops.iter().any(|l| l.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
        }
        run.stop.store(true, Ordering::Relaxed);
        for l in loops {
            l.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
        }
        Ok(())
    })?;
    let verdicts = finish(&run, &pools)?;
    let mut failed = false;
    for v in &verdicts {
        failed |= !v.passed;
        println!(
            "{}  {}: {}",
            if v.passed { "PASS" } else { "FAIL" },
            v.check,
            v.detail
        );
    }
    if failed {
        println!(
            "daemon log: {}",
            lock(&run.station).dir.join("daemon.log").display()
        );
        // The daemon stops with the run (Station's drop), before the exit status is set.
        drop(run);
        std::process::exit(1);
    }
    Ok(())
}

/// The simulator (knowing every card, OAuth for SCEPman with 30-second tokens) and the daemon.
fn start(args: &Args, pools: &[Vec<PoolCard>]) -> Result<Run> {
    let cards: Vec<&PoolCard> = pools.iter().flatten().collect();
    let fixture = Fixture {
        smartcards: cards
            .iter()
            .map(|c| matching_record(&c.card.truth, true))
            .collect(),
        scepman: cards
            .iter()
            .flat_map(|c| scepman_certs(&c.card.truth))
            .collect(),
        ..Fixture::default()
    };
    let sim = Simulator::start(fixture, 0)?;
    sim.set_auth(SimAuth::OAuth(OAuthApp {
        client_id: CLIENT_ID.into(),
        client_secret: Some(SECRET.into()),
        assertion_public_key: None,
        token_lifetime: Duration::from_secs(30),
        roles: vec!["Manage.All".into()],
    }))?;
    let dir = std::env::temp_dir().join(format!(
        "cardbridge-{}",
        if args.soak { "soak" } else { "chaos" }
    ));
    let (station, port) = Station::start(&dir, &sim)?;
    Ok(Run {
        soak: args.soak,
        length: args.length(),
        stop: AtomicBool::new(false),
        pcscd: RwLock::new(()),
        station: Mutex::new(station),
        daemon: Mutex::new((port, 0)),
        sim,
        insertions: Mutex::new(Vec::new()),
        outages: Mutex::new(Vec::new()),
        observed: Mutex::new(Vec::new()),
        churned: Mutex::new(Vec::new()),
        submitted: Mutex::new(Vec::new()),
        read_once: Mutex::new(Vec::new()),
    })
}

/// After the load: faults off, one card left in the first reader, revocations given time to be
/// delivered; then every check.
fn finish(run: &Run, pools: &[Vec<PoolCard>]) -> Result<Vec<Verdict>> {
    for route in ["smartcards", "certificates", "search", "revoke"] {
        run.sim.set_fault(route, Fault::default());
    }
    let last = &pools[0][0];
    // The movers have pulled their cards. Another card put in before pcscd's next poll of the
    // slot (every 400 ms for vpcd) would look, to pcscd and to every PC/SC client, like the
    // same card left in: wait until pcscd has seen the slot empty (retried while a pcscd the
    // run killed comes back).
    let reader = rig::reader_name(0);
    let until = Instant::now() + Duration::from_secs(30);
    while let Err(e) = rig::wait_for_card(&reader, false) {
        if Instant::now() > until {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let card = Inserted::insert(last.card.clone(), rig::BASE_PORT, false)?;
    let in_readers = vec![(rig::reader_name(0), last.id.clone())];
    let listed = eventually(Duration::from_secs(15), || {
        let listed = listed_cards(run.port());
        (listed == in_readers)
            .then_some(listed.clone())
            .ok_or(listed)
    });
    let statuses = eventually(Duration::from_secs(60), || {
        let statuses = revocation_statuses(run);
        let settled = statuses
            .iter()
            .all(|s| !matches!(s.status.as_str(), "queued" | "in_progress"));
        if settled {
            Ok(statuses)
        } else {
            Err(statuses)
        }
    });
    let observed = lock(&run.observed).clone();
    let events: Vec<Received> = observed.iter().flatten().cloned().collect();
    let mut streams: Vec<Vec<u64>> = observed
        .iter()
        .map(|s| s.iter().map(|e| e.id).collect())
        .collect();
    streams.extend(lock(&run.churned).iter().cloned());
    let insertions = lock(&run.insertions).clone();
    let outages = lock(&run.outages).clone();
    let log = lock(&run.station).log();
    let end = now();
    drop(card);
    println!(
        "{} insertions, {} pcscd/daemon kills, {} events seen, {} stream clients, {} revocations",
        insertions.len(),
        outages.len(),
        events.len(),
        streams.len(),
        statuses.len()
    );
    Ok(vec![
        chaos::no_panic(&log),
        chaos::reads_name_the_card_in_the_reader(&insertions, &events),
        chaos::held_cards_read_once(&insertions, &outages, &events, end),
        chaos::revocations_delivered_once(&statuses, &run.sim.revocations_carried_out()),
        chaos::no_event_id_gaps(&streams),
        chaos::cards_equal_readers(&listed, &in_readers),
    ])
}

/// Polls `f` until it is `Ok` or `limit` passes; either way returns its last value.
fn eventually<T>(limit: Duration, mut f: impl FnMut() -> Result<T, T>) -> T {
    let until = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(v) if Instant::now() > until => return v,
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// (reader, card id) of every card `GET /v1/cards` lists.
fn listed_cards(port: u16) -> Vec<(String, String)> {
    let Ok((200, body)) = http(port, TOKEN, "GET", "/v1/cards", &[], "") else {
        return Vec::new();
    };
    serde_json::from_str::<Vec<Value>>(&body)
        .unwrap_or_default()
        .iter()
        .filter_map(|c| {
            Some((
                c["reader"].as_str()?.to_string(),
                c["card_id"].as_str()?.to_string(),
            ))
        })
        .collect()
}

fn revocation_statuses(run: &Run) -> Vec<Submitted> {
    let submitted = lock(&run.submitted).clone();
    submitted
        .into_iter()
        .map(|(id, serial_number)| {
            let status =
                revocation_status(run.port(), TOKEN, id).unwrap_or_else(|| "unknown".into());
            Submitted {
                serial_number,
                status,
            }
        })
        .collect()
}
