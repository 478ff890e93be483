//! The simulated year (`hw-tests/soak --simulated N`): a million insertions in minutes.
//!
//! Two processes, so that the figures are the station's alone:
//! - the station (`year --station`, started by the other): the daemon's own code
//!   (`cardbridge::daemon::run_on`) on scripted readers. Monitor events come from its standard
//!   input (`insert READER CARD`, `pull READER`); a read is the card layer talking to a virtual
//!   card directly, without pcscd. The servers are the MIM CM simulator.
//! - the world (`year`): the simulator with a record for most of the pool's cards, the kiosk
//!   that inserts a card, waits for its read and reconciliation on the event stream, pulls it
//!   and takes the next (one such loop per reader, all driven by the one stream), a revocation
//!   every so many insertions, API clients and stream clients coming and going beside. Every
//!   `--every` insertions it prints the station's resident memory, descriptors, threads, state
//!   directory and each table's rows; at the end, the chaos run's checks, the tables' bounds and
//!   whether memory and state stayed flat over the last half.
//!
//! The cards: `--cards` distinct card ids over a few templates (the same certificates under
//! different CHUIDs), so the pool costs no key pair per card. The state directory is on
//! `/dev/shm` when there is one: the run measures bounds, not the disk.

use std::cell::Cell;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use cardbridge::card::{read_card, Card, ReadOptions, TransportError};
use cardbridge::engine::Source;
use cardbridge::pcsc::MonitorEvent;
use cardbridge::slots::{Slot, Slots};
use clap::Parser;
use hw_tests::chaos::{self, Received, Verdict};
use hw_tests::sim::{matching_record, smartcard_uuid, Fixture, Simulator};
use hw_tests::station_client::{http, open_stream, read_frames, sample, Sample};
use hw_tests::vcard::{CardSpec, Compress, Direct, Truth, VirtualCard};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

#[derive(Parser)]
struct Args {
    /// Insertions in all.
    #[arg(long, default_value_t = 1_000_000)]
    insertions: u64,
    /// Distinct cards (card ids) the insertions draw from.
    #[arg(long, default_value_t = 60_000)]
    cards: u64,
    #[arg(long, default_value_t = 8)]
    readers: usize,
    /// A report every this many insertions.
    #[arg(long, default_value_t = 100_000)]
    every: u64,
    /// A revocation (of the card in a reader, through MIM CM) every this many insertions.
    #[arg(long, default_value_t = 10_000)]
    revoke_every: u64,
    #[arg(long)]
    seed: Option<u64>,
    /// The station's state directory (default: on /dev/shm, removed first).
    #[arg(long)]
    state: Option<PathBuf>,
    /// Internal: be the station.
    #[arg(long, hide = true)]
    station: bool,
    /// Internal (station): the MIM CM simulator's base URL.
    #[arg(long, hide = true)]
    cm: Option<String>,
    /// Internal (station): the API port.
    #[arg(long, hide = true, default_value_t = 0)]
    port: u16,
}

const TOKEN: &str = "year-admin-token-0123456789";
/// Certificate sets the pool's cards share.
const TEMPLATES: usize = 16;
/// Longest wait for the next event before the run counts as stalled.
const STALL: Duration = Duration::from_secs(60);

fn main() -> Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| fastrand::u64(..));
    let state = args.state.clone().unwrap_or_else(default_state);
    if args.station {
        return station(&args, seed, &state);
    }
    world(&args, seed, &state)
}

fn default_state() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("cardbridge-year-{}", std::process::id()))
}

fn reader_name(i: usize) -> String {
    format!("Simulated Reader {i:02}")
}

/// Card `index`'s id: the same in both processes, from the seed.
fn card_id(seed: u64, index: u64) -> [u8; 16] {
    let digest = Sha256::digest(format!("{seed}:{index}"));
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

/// Every tenth card has no record at MIM CM (a card issued elsewhere).
fn registered(index: u64) -> bool {
    index % 10 != 9
}

// ---------------------------------------------------------------------------------------------
// The station

/// The scripted readers: the card in each, shared by the command loop and the reader workers.
#[derive(Clone, Default)]
struct Readers(Arc<Mutex<std::collections::HashMap<String, Option<VirtualCard>>>>);

impl Slots for Readers {
    fn open(&self, reader: &str) -> Box<dyn Slot> {
        Box::new(ScriptedSlot {
            readers: self.clone(),
            reader: reader.to_string(),
        })
    }
}

struct ScriptedSlot {
    readers: Readers,
    reader: String,
}

impl Slot for ScriptedSlot {
    fn read(&mut self, options: &ReadOptions) -> Card {
        let mut readers = self.readers.0.lock().unwrap_or_else(|p| p.into_inner());
        match readers.get_mut(&self.reader).and_then(Option::as_mut) {
            Some(card) => {
                let atr = card.atr.clone();
                let clock = cardbridge::clock::SystemClock;
                read_card(&mut Direct(card), &self.reader, &atr, options, &clock)
            }
            None => cardbridge::pcsc::unreadable(&self.reader, &[], TransportError::CardRemoved),
        }
    }

    fn holds_unreported_card(&mut self) -> bool {
        false
    }
}

/// The templates: PIV cards with one or two certificates.
fn templates() -> Result<Vec<VirtualCard>> {
    (0..TEMPLATES)
        .map(|i| {
            let mut spec = CardSpec::piv_four_certs();
            spec.slots = if i % 2 == 0 {
                vec![(0x9A, Compress::None)]
            } else {
                vec![(0x9A, Compress::None), (0x9C, Compress::None)]
            };
            VirtualCard::new(spec)
        })
        .collect()
}

fn station(args: &Args, seed: u64, state: &Path) -> Result<()> {
    cardbridge::logging::init(Some("warn"));
    let templates = templates()?;
    let truths: Vec<&Truth> = templates.iter().map(|t| &t.truth).collect();
    let truth_file = state.join("templates.json");
    std::fs::write(&truth_file, serde_json::to_vec(&truths)?)?;
    println!("templates {}", truth_file.display());
    let mut lines = std::io::stdin().lock().lines();
    if lines.next().transpose()?.as_deref() != Some("go") {
        bail!("the world did not say go");
    }
    let cm = args.cm.as_deref().context("--station needs --cm")?;
    let config = cardbridge::config::Config::parse(&format!(
        "state_dir = \"{}\"\n[api]\nlisten = [\"127.0.0.1:{}\"]\nrevocation_burst = 100\n\
         [[api.clients]]\nname = \"year\"\ntoken_sha256 = \"{}\"\nscopes = [\"read\", \"sync\", \"revoke\"]\n\
         [cm]\nbase_url = \"{cm}\"\ntimeout_ms = 5000\nauth = \"none\"\n",
        state.join("state").display(),
        args.port,
        hex::encode(Sha256::digest(TOKEN)),
    ))
    .map_err(anyhow::Error::msg)?;
    let readers = Readers::default();
    let (monitor, events) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = {
        let source = Source::Scripted {
            monitor: events,
            slots: Arc::new(readers.clone()),
        };
        std::thread::spawn(move || {
            cardbridge::daemon::run_on(&config, source, async {
                let _ = stopped.await;
            })
        })
    };
    for i in 0..args.readers {
        let _ = monitor.send(MonitorEvent::ReaderAdded {
            reader: reader_name(i),
        });
    }
    for line in lines {
        if !command(&line?, seed, &templates, &readers, &monitor)? {
            break;
        }
    }
    drop(monitor);
    let _ = stop.send(());
    match daemon.join() {
        Ok(result) => result.map_err(anyhow::Error::from),
        Err(_) => bail!("the daemon's thread panicked"),
    }
}

/// Carries out one line of the world's script; false at `quit`.
fn command(
    line: &str,
    seed: u64,
    templates: &[VirtualCard],
    readers: &Readers,
    monitor: &Sender<MonitorEvent>,
) -> Result<bool> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let reader = |i: &str| -> Result<String> { Ok(reader_name(i.parse()?)) };
    match words.as_slice() {
        ["insert", r, index] => {
            let index: u64 = index.parse()?;
            let template = &templates[index as usize % templates.len()];
            let card = template.with_card_id(card_id(seed, index))?;
            let atr = card.atr.clone();
            let reader = reader(r)?;
            lock(&readers.0).insert(reader.clone(), Some(card));
            let _ = monitor.send(MonitorEvent::CardInserted { reader, atr });
        }
        ["pull", r] => {
            let reader = reader(r)?;
            lock(&readers.0).insert(reader.clone(), None);
            let _ = monitor.send(MonitorEvent::CardRemoved { reader });
        }
        ["quit"] => return Ok(false),
        _ => bail!("unknown command {line:?}"),
    }
    Ok(true)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The world

/// The station's process, its command pipe and its log.
struct StationProcess {
    child: Child,
    commands: ChildStdin,
    log: PathBuf,
}

impl StationProcess {
    fn send(&mut self, line: &str) -> Result<()> {
        writeln!(self.commands, "{line}").context("the station is gone")
    }

    /// Asks the station to stop; kills it if it has not within 30 s.
    fn quit(mut self) -> Result<std::process::ExitStatus> {
        let _ = self.send("quit");
        let until = Instant::now() + Duration::from_secs(30);
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        bail!("the station did not stop within 30 s")
    }
}

fn world(args: &Args, seed: u64, state: &Path) -> Result<()> {
    println!(
        "simulated year: {} insertions of {} cards in {} readers, seed {seed}, state {}",
        args.insertions,
        args.cards,
        args.readers,
        state.display()
    );
    let _ = std::fs::remove_dir_all(state);
    std::fs::create_dir_all(state.join("state"))?;
    let sim = Simulator::start(
        Fixture {
            complete_requests_after: 2,
            ..Fixture::default()
        },
        0,
    )?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut station = spawn_station(args, seed, state, &sim, port)?;
    let started = Instant::now();
    let done = AtomicBool::new(false);
    let api_failures = AtomicU64::new(0);
    let verdicts = std::thread::scope(|scope| -> Result<Vec<Verdict>> {
        scope.spawn(|| api_client(port, &done, &api_failures));
        scope.spawn(|| stream_churner(port, &done));
        let kiosk = Kiosk::run(args, seed, port, &mut station, state);
        done.store(true, Ordering::Relaxed);
        let mut verdicts = kiosk?;
        let failures = api_failures.load(Ordering::Relaxed);
        verdicts.push(Verdict {
            check: "API clients answered",
            passed: failures == 0,
            detail: format!("{failures} requests failed or got 5xx"),
        });
        verdicts.push(revocations_reached_cm_once(
            &sim,
            &revocations_at_end(port, state)?,
        ));
        verdicts.push(cards_equal_readers(port, args.readers));
        Ok(verdicts)
    })?;
    let pid = station.child.id();
    let log = station.log.clone();
    let status = station.quit()?;
    let mut verdicts = verdicts;
    verdicts.push(chaos::no_panic(
        &std::fs::read_to_string(&log).unwrap_or_default(),
    ));
    verdicts.push(Verdict {
        check: "the station stopped cleanly",
        passed: status.success(),
        detail: format!("pid {pid}: {status}"),
    });
    println!("{} s in all", started.elapsed().as_secs());
    let mut failed = false;
    for v in &verdicts {
        failed |= !v.passed;
        let mark = if v.passed { "PASS" } else { "FAIL" };
        println!("{mark}  {}: {}", v.check, v.detail);
    }
    if failed {
        println!("station log: {}", log.display());
        std::process::exit(1);
    }
    let _ = std::fs::remove_dir_all(state);
    Ok(())
}

/// Starts the station, hands the simulator the records of the pool's cards (made from the
/// station's templates), then lets it start its daemon and waits until the API answers.
fn spawn_station(
    args: &Args,
    seed: u64,
    state: &Path,
    sim: &Simulator,
    port: u16,
) -> Result<StationProcess> {
    let log = state.join("station.log");
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "--station",
            "--seed",
            &seed.to_string(),
            "--port",
            &port.to_string(),
        ])
        .arg("--state")
        .arg(state)
        .args(["--cm", &sim.cm_base_url()])
        // As the service unit runs the daemon (service/cardbridge.service).
        .env("MALLOC_ARENA_MAX", "2")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let commands = child.stdin.take().context("the station's stdin")?;
    let stdout = child.stdout.take().context("the station's stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut station = StationProcess {
        child,
        commands,
        log,
    };
    let line = rx
        .recv_timeout(Duration::from_secs(300))
        .context("the station made no templates within 300 s")?;
    let path = line
        .strip_prefix("templates ")
        .with_context(|| format!("the station said {line:?}"))?;
    let truths: Vec<Truth> = serde_json::from_slice(&std::fs::read(path)?)?;
    sim.replace_fixture(fixture(&truths, seed, args.cards));
    station.send("go")?;
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, _)) = http(port, TOKEN, "GET", "/v1/health", &[], "") {
            return Ok(station);
        }
        if Instant::now() > until || station.child.try_wait()?.is_some() {
            bail!(
                "the station's API did not answer within 60 s; see {}",
                station.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Card `index` as the station makes it: its template's truth under its own id.
fn truth_of(truths: &[Truth], seed: u64, index: u64) -> Truth {
    let mut truth = truths[index as usize % truths.len()].clone();
    truth.card_id = Some(hex::encode_upper(card_id(seed, index)));
    truth
}

fn fixture(truths: &[Truth], seed: u64, cards: u64) -> Fixture {
    Fixture {
        smartcards: (0..cards)
            .filter(|i| registered(*i))
            .map(|i| matching_record(&truth_of(truths, seed, i), false))
            .collect(),
        scepman: Vec::new(),
        complete_requests_after: 2,
    }
}

/// Where one reader's kiosk loop is.
#[derive(Debug, Clone)]
enum Flow {
    Empty,
    /// Card `index` went in; its reads so far, and whether its reconciliation arrived.
    Holding {
        index: u64,
        card_id: String,
        reads: u32,
        reconciled: bool,
    },
    /// The card was pulled; waiting for `card.removed`.
    Pulling,
}

/// The kiosk: one loop per reader, driven by the event stream, with the streaming checks.
struct Kiosk<'a> {
    seed: u64,
    cards: u64,
    insertions: u64,
    every: u64,
    revoke_every: u64,
    port: u16,
    station: &'a mut StationProcess,
    state: &'a Path,
    flows: Vec<Flow>,
    /// Insertions started, and ended (card pulled and its removal seen).
    started: u64,
    ended: u64,
    last_id: Option<u64>,
    gaps: Vec<String>,
    wrong_reads: Vec<String>,
    read_twice: Vec<String>,
    /// Revocations submitted: id and card id.
    revoked: Vec<(u64, String)>,
    /// Cards pulled since the last revocation.
    since_revocation: u64,
    revocation_errors: Vec<String>,
    reports: Vec<(u64, Sample)>,
    clock: Instant,
}

impl<'a> Kiosk<'a> {
    fn run(
        args: &Args,
        seed: u64,
        port: u16,
        station: &'a mut StationProcess,
        state: &'a Path,
    ) -> Result<Vec<Verdict>> {
        let mut kiosk = Kiosk {
            seed,
            cards: args.cards,
            insertions: args.insertions,
            every: args.every,
            revoke_every: args.revoke_every,
            port,
            station,
            state,
            flows: vec![Flow::Empty; args.readers],
            started: 0,
            ended: 0,
            last_id: None,
            gaps: Vec::new(),
            wrong_reads: Vec::new(),
            read_twice: Vec::new(),
            revoked: Vec::new(),
            since_revocation: 0,
            revocation_errors: Vec::new(),
            reports: Vec::new(),
            clock: Instant::now(),
        };
        kiosk.report_header();
        kiosk.report(0)?;
        for reader in 0..kiosk.flows.len() {
            kiosk.insert_next(reader)?;
        }
        kiosk.drive()?;
        Ok(kiosk.verdicts())
    }

    /// Reads the stream (again after it ends, from the last id) until every insertion ended;
    /// fails when no event comes for [`STALL`] or a command cannot reach the station.
    fn drive(&mut self) -> Result<()> {
        let last_event = Cell::new(Instant::now());
        let finished = Cell::new(false);
        let mut failure = None;
        while !finished.get() && failure.is_none() {
            if last_event.get().elapsed() >= STALL {
                bail!(
                    "no event for {} s after {} insertions; readers: {:?}",
                    STALL.as_secs(),
                    self.ended,
                    self.flows
                );
            }
            // From the daemon's first event (0) at the start: the first insertions went in
            // before the stream was open.
            let after = Some(self.last_id.unwrap_or(0));
            let Ok(mut stream) = open_stream(self.port, TOKEN, after) else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let keep_going = || !finished.get() && last_event.get().elapsed() < STALL;
            read_frames(&mut stream, &keep_going, None, |event| {
                last_event.set(Instant::now());
                if failure.is_none() {
                    failure = self.on_event(event).err();
                }
                finished.set(self.ended >= self.insertions || failure.is_some());
            });
        }
        failure.map_or(Ok(()), Err)
    }

    fn on_event(&mut self, event: Received) -> Result<()> {
        if let Some(last) = self.last_id {
            if event.id != last + 1 {
                self.gaps.push(format!("{last} → {}", event.id));
            }
        }
        self.last_id = Some(event.id);
        let reader = event.data["reader"]
            .as_str()
            .and_then(|r| r.strip_prefix("Simulated Reader "))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n < self.flows.len());
        match (event.name.as_str(), reader) {
            ("card.read" | "card.read_failed", Some(r)) => self.on_read(r, &event),
            ("card.reconciled", _) => {
                let id = event.data["card_id"].as_str().unwrap_or_default();
                let holder = self.flows.iter().position(
                    |f| matches!(f, Flow::Holding { card_id, .. } if card_id.eq_ignore_ascii_case(id)),
                );
                let Some(r) = holder else {
                    return Ok(());
                };
                if let Flow::Holding { reconciled, .. } = &mut self.flows[r] {
                    *reconciled = true;
                }
                self.pull_when_done(r)
            }
            ("card.removed", Some(r)) if matches!(self.flows[r], Flow::Pulling) => {
                self.flows[r] = Flow::Empty;
                self.ended += 1;
                if self.ended % self.every == 0 {
                    self.report(self.ended)?;
                }
                self.insert_next(r)
            }
            _ => Ok(()),
        }
    }

    fn on_read(&mut self, r: usize, event: &Received) -> Result<()> {
        let Flow::Holding { card_id, reads, .. } = &mut self.flows[r] else {
            self.wrong_reads
                .push(format!("{} in an empty {}", event.name, reader_name(r)));
            return Ok(());
        };
        *reads += 1;
        let read = event.data["card_id"].as_str().unwrap_or_default();
        if event.name != "card.read" || !read.eq_ignore_ascii_case(card_id) {
            self.wrong_reads.push(format!(
                "{} of {read:?} while {card_id} was in {}: {}",
                event.name,
                reader_name(r),
                event.data["error"]
            ));
        }
        if *reads == 2 {
            self.read_twice.push(card_id.clone());
        }
        self.pull_when_done(r)
    }

    /// Pulls the card once it was read and reconciled, revoking it first when its turn came.
    fn pull_when_done(&mut self, r: usize) -> Result<()> {
        let Flow::Holding {
            index,
            card_id,
            reads,
            reconciled,
        } = &self.flows[r]
        else {
            return Ok(());
        };
        if *reads == 0 || !*reconciled {
            return Ok(());
        }
        let (index, card_id) = (*index, card_id.clone());
        self.since_revocation += 1;
        if registered(index) && self.since_revocation >= self.revoke_every {
            self.since_revocation = 0;
            self.revoke(&card_id);
        }
        self.flows[r] = Flow::Pulling;
        self.station.send(&format!("pull {r}"))
    }

    fn revoke(&mut self, card_id: &str) {
        let body = json!({"card_id": card_id, "target": "card", "operation": "revoke",
            "reason": "superseded", "revoker": "year@contoso.com"})
        .to_string();
        let key = format!("year-{}", self.revoked.len() + self.revocation_errors.len());
        let headers = [
            ("Content-Type", "application/json"),
            ("Idempotency-Key", key.as_str()),
        ];
        match http(self.port, TOKEN, "POST", "/v1/revocations", &headers, &body) {
            Ok((202, answer)) => {
                match serde_json::from_str::<Value>(&answer)
                    .ok()
                    .and_then(|v| v["id"].as_u64())
                {
                    Some(id) => self.revoked.push((id, card_id.to_string())),
                    None => self
                        .revocation_errors
                        .push(format!("202 without an id: {answer}")),
                }
            }
            Ok((status, answer)) => self
                .revocation_errors
                .push(format!("{card_id}: {status} {answer}")),
            Err(e) => self.revocation_errors.push(format!("{card_id}: {e}")),
        }
    }

    /// Puts the next card in reader `r`: one that is in no other reader.
    fn insert_next(&mut self, r: usize) -> Result<()> {
        if self.started >= self.insertions {
            return Ok(());
        }
        let index = loop {
            let index = fastrand::u64(..self.cards);
            let in_use = self
                .flows
                .iter()
                .any(|f| matches!(f, Flow::Holding { index: i, .. } if *i == index));
            if !in_use {
                break index;
            }
        };
        self.started += 1;
        self.flows[r] = Flow::Holding {
            index,
            card_id: hex::encode_upper(card_id(self.seed, index)),
            reads: 0,
            reconciled: false,
        };
        self.station.send(&format!("insert {r} {index}"))
    }

    fn report_header(&self) {
        println!(
            "{:>9} {:>6} {:>6} {:>8} {:>4} {:>7} {:>9}  rows",
            "insertions", "s", "per s", "rss_kib", "fds", "threads", "state_kib"
        );
    }

    fn report(&mut self, done: u64) -> Result<()> {
        let s = sample(self.station.child.id(), &self.state.join("state"));
        let seconds = self.clock.elapsed().as_secs_f64();
        let rows = row_counts(&self.state.join("state").join("cardbridge.db"))?;
        let rows: Vec<String> = rows.iter().map(|(t, n)| format!("{t} {n}")).collect();
        println!(
            "{done:>10} {:>6.0} {:>6.0} {:>8} {:>4} {:>7} {:>9}  {}",
            seconds,
            done as f64 / seconds.max(0.001),
            s.rss_kib,
            s.fds,
            s.threads,
            s.state_kib,
            rows.join(", ")
        );
        self.reports.push((done, s));
        Ok(())
    }

    fn verdicts(&self) -> Vec<Verdict> {
        let list = |v: &[String]| v.iter().take(5).cloned().collect::<Vec<_>>().join("; ");
        let mut verdicts = vec![
            Verdict {
                check: "reads name the card in the reader",
                passed: self.wrong_reads.is_empty(),
                detail: format!(
                    "{} wrong: {}",
                    self.wrong_reads.len(),
                    list(&self.wrong_reads)
                ),
            },
            Verdict {
                check: "every insertion read once",
                passed: self.read_twice.is_empty() && self.ended == self.insertions,
                detail: format!(
                    "{} insertions ended, {} read twice: {}",
                    self.ended,
                    self.read_twice.len(),
                    list(&self.read_twice)
                ),
            },
            Verdict {
                check: "no event id gaps",
                passed: self.gaps.is_empty(),
                detail: format!("{} gaps: {}", self.gaps.len(), list(&self.gaps)),
            },
            Verdict {
                check: "revocations accepted",
                passed: self.revocation_errors.is_empty() && !self.revoked.is_empty(),
                detail: format!(
                    "{} submitted, {} refused: {}",
                    self.revoked.len(),
                    self.revocation_errors.len(),
                    list(&self.revocation_errors)
                ),
            },
        ];
        // The state grows until every table is at its bound (the sightings' is the last one
        // reached, an insertion a row): only a run whose last half starts past it can be flat.
        let filled = cardbridge::store::ROW_BOUNDS
            .iter()
            .map(|(_, bound)| *bound as u64)
            .max()
            .unwrap_or(0);
        if self.insertions >= 2 * filled {
            verdicts.extend(flat_over_last_half(&self.reports));
        } else {
            println!(
                "SKIP  memory and state flat over the last half: a run of {} insertions ends \
                 before its last half could start at the tables' bounds ({filled} rows)",
                self.insertions
            );
        }
        verdicts.push(tables_within_bounds(
            &self.state.join("state").join("cardbridge.db"),
        ));
        verdicts
    }
}

/// Rows in every table, read beside the running daemon.
fn row_counts(db: &Path) -> Result<Vec<(String, i64)>> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    tables
        .into_iter()
        .map(|t| {
            let n = conn.query_row(&format!("SELECT count(*) FROM \"{t}\""), [], |r| r.get(0))?;
            Ok((t, n))
        })
        .collect()
}

/// Resident memory and state size over the reports of the last half: the largest at most 10 %
/// above the smallest.
fn flat_over_last_half(reports: &[(u64, Sample)]) -> Vec<Verdict> {
    let last = reports.last().map_or(0, |r| r.0);
    let half: Vec<&Sample> = reports
        .iter()
        .filter(|(n, _)| *n * 2 >= last && *n > 0)
        .map(|(_, s)| s)
        .collect();
    let flat = |check: &'static str, values: Vec<u64>| {
        let (min, max) = (values.iter().min(), values.iter().max());
        let passed = match (min, max) {
            (Some(&min), Some(&max)) => values.len() >= 2 && max as f64 <= min as f64 * 1.10,
            _ => false,
        };
        Verdict {
            check,
            passed,
            detail: format!("{values:?} KiB"),
        }
    };
    vec![
        flat(
            "resident memory flat over the last half (within 10 %)",
            half.iter().map(|s| s.rss_kib).collect(),
        ),
        flat(
            "state directory flat over the last half (within 10 %)",
            half.iter().map(|s| s.state_kib).collect(),
        ),
    ]
}

fn tables_within_bounds(db: &Path) -> Verdict {
    let rows = match row_counts(db) {
        Ok(rows) => rows,
        Err(e) => {
            return Verdict {
                check: "every table within its bound",
                passed: false,
                detail: e.to_string(),
            }
        }
    };
    let over: Vec<String> = cardbridge::store::ROW_BOUNDS
        .iter()
        .filter_map(|(table, bound)| {
            let n = rows.iter().find(|(t, _)| t == table).map_or(0, |r| r.1);
            (n > *bound).then(|| format!("{table} {n} > {bound}"))
        })
        .collect();
    Verdict {
        check: "every table within its bound",
        passed: over.is_empty(),
        detail: if over.is_empty() {
            let bounds: Vec<String> = cardbridge::store::ROW_BOUNDS
                .iter()
                .map(|(t, b)| format!("{t} ≤ {b}"))
                .collect();
            bounds.join(", ")
        } else {
            over.join("; ")
        },
    }
}

/// Waits (60 s at most) for every submitted revocation to end; returns them with their final
/// status and card id.
fn revocations_at_end(port: u16, state: &Path) -> Result<Vec<(String, String)>> {
    let db = state.join("state").join("cardbridge.db");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let ids: Vec<(i64, String)> = conn
        .prepare("SELECT id, card_id FROM revocations ORDER BY id")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let until = Instant::now() + Duration::from_secs(60);
    let mut out = Vec::new();
    for (id, card) in ids {
        let status = loop {
            let status = http(
                port,
                TOKEN,
                "GET",
                &format!("/v1/revocations/{id}"),
                &[],
                "",
            )
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .and_then(|v| v["status"].as_str().map(str::to_string))
            .unwrap_or_default();
            if status == "succeeded" || status == "failed" || Instant::now() > until {
                break status;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        out.push((card, status));
    }
    Ok(out)
}

/// Every revocation succeeded, and MIM CM got exactly one request per revocation (a card drawn
/// twice is revoked twice).
fn revocations_reached_cm_once(sim: &Simulator, revoked: &[(String, String)]) -> Verdict {
    let requests: Vec<String> = sim.requests().iter().map(Value::to_string).collect();
    let mut cards: Vec<&String> = revoked.iter().map(|(card, _)| card).collect();
    cards.sort();
    cards.dedup();
    let mut problems: Vec<String> = revoked
        .iter()
        .filter(|(_, status)| status != "succeeded")
        .map(|(card, status)| format!("{card}: {status}"))
        .collect();
    for card in cards {
        let truth = Truth {
            atr: String::new(),
            card_id: Some(card.clone()),
            serial_number: None,
            certificates: Vec::new(),
        };
        let uuid = smartcard_uuid(&truth);
        let sent = requests.iter().filter(|r| r.contains(&uuid)).count();
        let wanted = revoked.iter().filter(|(c, _)| c == card).count();
        if sent != wanted {
            problems.push(format!("{card}: {wanted} revocations, {sent} CM requests"));
        }
    }
    Verdict {
        check: "revocations carried out once",
        passed: problems.is_empty() && !revoked.is_empty(),
        detail: format!("{} revocations; {}", revoked.len(), problems.join("; ")),
    }
}

/// At the end every card is out: the API lists no card, and every reader.
fn cards_equal_readers(port: u16, readers: usize) -> Verdict {
    let cards = http(port, TOKEN, "GET", "/v1/cards", &[], "");
    let listed = http(port, TOKEN, "GET", "/v1/readers", &[], "");
    let count = |answer: &Result<(u16, String)>| match answer {
        Ok((200, body)) => serde_json::from_str::<Vec<Value>>(body)
            .ok()
            .map(|v| v.len()),
        _ => None,
    };
    let (cards, listed) = (count(&cards), count(&listed));
    Verdict {
        check: "cards listed equal cards in readers",
        passed: cards == Some(0) && listed == Some(readers),
        detail: format!("{cards:?} cards and {listed:?} readers listed; 0 and {readers} in place"),
    }
}

/// A kiosk's other calls until the run ends, ten rounds a second: the card list, the readers,
/// health, the revocation trail.
fn api_client(port: u16, done: &AtomicBool, failures: &AtomicU64) {
    let paths = [
        "/v1/cards",
        "/v1/readers",
        "/v1/health",
        "/v1/revocations?$top=20",
    ];
    while !done.load(Ordering::Relaxed) {
        for path in paths {
            match http(port, TOKEN, "GET", path, &[], "") {
                Ok((200 | 429, _)) => {}
                _ => {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stream clients that connect, listen a second and leave.
fn stream_churner(port: u16, done: &AtomicBool) {
    while !done.load(Ordering::Relaxed) {
        if let Ok(mut stream) = open_stream(port, TOKEN, None) {
            let until = Instant::now() + Duration::from_secs(1);
            read_frames(
                &mut stream,
                &|| !done.load(Ordering::Relaxed),
                Some(until),
                |_| {},
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
