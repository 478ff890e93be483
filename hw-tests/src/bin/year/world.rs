//! The world around the station: the simulator, the station process, and the API and stream
//! clients beside the kiosk.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use hw_tests::chaos::{self, Verdict};
use hw_tests::sim::{matching_record, Fixture, Simulator};
use hw_tests::station_client::{http, open_stream, read_frames, unit_environment};
use hw_tests::vcard::Truth;

use crate::checks::{cards_equal_readers, revocations_at_end, revocations_reached_cm_once};
use crate::kiosk::Kiosk;
use crate::{card_id, registered, Args, TOKEN};

/// The station's process, its command pipe and its log.
pub struct StationProcess {
    pub child: Child,
    commands: ChildStdin,
    log: PathBuf,
}

impl StationProcess {
    pub fn send(&mut self, line: &str) -> Result<()> {
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

pub fn run(args: &Args, seed: u64, state: &Path) -> Result<()> {
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
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    verdicts.push(chaos::no_panic(&logged));
    // The station logs warnings and errors only, and nothing in the year should be one (a
    // store call that failed, a server that did not answer).
    let errors: Vec<&str> = logged.lines().filter(|l| l.contains(" ERROR ")).collect();
    verdicts.push(Verdict {
        check: "no error in the station's log",
        passed: errors.is_empty(),
        detail: format!(
            "{} errors: {}",
            errors.len(),
            errors
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ")
        ),
    });
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
        .envs(unit_environment())
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
