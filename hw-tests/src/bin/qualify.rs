//! `qualify`: brings a new reader or card model to a station. It reads every present card with
//! cardbridge, with OpenSC and (for a YubiKey) with ykman, compares what they read, then has the
//! card removed and inserted N times and times each step. It prints a pass/fail table and writes
//! a JSON report to attach to a support ticket.
//!
//! With `--virtual` it brings its own virtual card (vpcd) and moves it itself, so CI runs it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::Value;
use sha1::{Digest, Sha1};
use sha2::Sha256;

use cardbridge::card::ReadOptions;
use cardbridge::config::CardIdOrder;
use cardbridge::engine::{Engine, EngineConfig, Event};
use cardbridge::reconcile::Reconciler;
use hw_tests::qualify::{
    compare, excuse_plain_idprime, opensc_certificate_ids, opensc_hex, opensc_piv_slot,
    opensc_version, parse_ykman, Check, Outcome, Reading, Timing,
};
use hw_tests::rig::{cardbridge_bin, insert_virtual, reader_index, Rig, Slot};
use hw_tests::vcard::{CardSpec, VirtualCard};
use hw_tests::vpcd::Inserted;

#[derive(Parser)]
#[command(
    about = "Qualify a reader and card model: cardbridge against OpenSC and ykman, and insertion timings"
)]
struct Args {
    /// Use a virtual card in the vpcd reader, moved by this tool (no person needed).
    #[arg(long = "virtual")]
    virtual_card: bool,
    /// With --virtual: the card to use, as a JSON CardSpec (default: the 4-certificate PIV
    /// YubiKey).
    #[arg(long, requires = "virtual_card")]
    virtual_spec: Option<PathBuf>,
    /// Remove-and-insert cycles.
    #[arg(long, default_value_t = 5)]
    cycles: usize,
    /// The ykman command; `none` leaves ykman out.
    #[arg(long, default_value = "ykman")]
    ykman: String,
    /// Where to write the JSON report.
    #[arg(long, default_value = "qualify-report.json")]
    report: PathBuf,
    /// How long to wait for a person to remove or insert a card, in seconds.
    #[arg(long, default_value_t = 120)]
    patience: u64,
}

/// One card's part of the report.
#[derive(Serialize)]
struct CardReport {
    reader: String,
    kind: String,
    apdu_count: u64,
    read_ms: u64,
    readings: Vec<Reading>,
    checks: Vec<Check>,
}

/// The remove-and-insert cycles of one reader.
#[derive(Serialize, Default)]
struct Cycles {
    reader: String,
    cycles: usize,
    /// Insert → `card.read`: from the insertion itself with --virtual, from pcscd's detection
    /// (`card.inserted`) with a real card.
    insert_to_read: Timing,
    /// Remove → `card.removed` (--virtual only: with a real card there is no earlier moment
    /// to measure from).
    remove_to_removed: Option<Timing>,
    /// `card.read` events per insertion: exactly one each is a pass.
    reads_per_insertion: Vec<usize>,
    problems: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    tool: &'static str,
    cardbridge_version: &'static str,
    generated_at: String,
    host: String,
    virtual_card: bool,
    cards: Vec<CardReport>,
    cycles: Vec<Cycles>,
    passed: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let report = run(&args)?;
    print_report(&report);
    std::fs::write(&args.report, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("cannot write {}", args.report.display()))?;
    println!("\nreport: {}", args.report.display());
    if !report.passed {
        std::process::exit(1);
    }
    Ok(())
}

fn run(args: &Args) -> Result<Report> {
    let (card_reports, cycles) = if args.virtual_card {
        let rig = Rig::get();
        let _alone = rig.exclusive();
        let slot = rig.slot();
        let spec = match &args.virtual_spec {
            Some(path) => serde_json::from_slice(&std::fs::read(path)?)
                .with_context(|| format!("{} is not a card spec", path.display()))?,
            None => CardSpec::piv_four_certs(),
        };
        let card = VirtualCard::new(spec)?;
        let inserted = insert_virtual(card.clone(), &slot)?;
        let reports = read_all(args)?;
        (reports, vec![virtual_cycles(args, &slot, card, inserted)?])
    } else {
        let reports = read_all(args)?;
        let cycles = reports
            .iter()
            .map(|card| person_cycles(args, &card.reader))
            .collect::<Result<Vec<_>>>()?;
        (reports, cycles)
    };
    if card_reports.is_empty() {
        bail!("no card is present: insert the card to qualify (or use --virtual)");
    }
    let passed = card_reports
        .iter()
        .flat_map(|c| &c.checks)
        .all(|c| c.outcome != Outcome::Fail)
        && cycles.iter().all(|c| c.problems.is_empty());
    Ok(Report {
        tool: "cardbridge qualify",
        cardbridge_version: env!("CARGO_PKG_VERSION"),
        generated_at: cardbridge::clock::now_rfc3339(),
        host: std::fs::read_to_string("/etc/hostname")
            .unwrap_or_default()
            .trim()
            .to_string(),
        virtual_card: args.virtual_card,
        cards: card_reports,
        cycles,
        passed,
    })
}

/// Every present card, read by cardbridge and by the other tools.
fn read_all(args: &Args) -> Result<Vec<CardReport>> {
    let out = Command::new(cardbridge_bin())
        .args(["scan", "--json"])
        .output()
        .context("run cardbridge scan")?;
    let cards: Vec<Value> =
        serde_json::from_slice(&out.stdout).context("cardbridge scan --json")?;
    let home = std::env::temp_dir().join(format!("cardbridge-qualify-{}", std::process::id()));
    std::fs::create_dir_all(&home)?;
    let mut reports = Vec::new();
    for card in cards {
        let ours = cardbridge_reading(&card);
        let reader = card["reader"].as_str().unwrap_or_default().to_string();
        let kind = card["kind"].as_str().unwrap_or("unknown");
        let mut readings = vec![ours.clone(), opensc_reading(&reader, kind, &home)?];
        if kind == "piv" && ours.serial_number.is_some() && args.ykman != "none" {
            readings.push(ykman_reading(&args.ykman, &reader)?);
        }
        let mut checks: Vec<Check> = readings[1..]
            .iter()
            .flat_map(|r| compare(&ours, r))
            .collect();
        if kind == "idprime" {
            excuse_plain_idprime(&mut checks, &plain_certificates(&card), installed_opensc());
        }
        reports.push(CardReport {
            reader,
            kind: card["kind"].as_str().unwrap_or("unknown").to_string(),
            apdu_count: card["apdu_count"].as_u64().unwrap_or_default(),
            read_ms: card["read_ms"].as_u64().unwrap_or_default(),
            readings,
            checks,
        });
    }
    let _ = std::fs::remove_dir_all(&home);
    Ok(reports)
}

/// The thumbprints of the certificates cardbridge read as stored uncompressed.
fn plain_certificates(card: &Value) -> BTreeSet<String> {
    card["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["compressed"] == false)
        .filter_map(|c| c["thumbprint"].as_str().map(str::to_string))
        .collect()
}

/// The installed OpenSC's version, from `opensc-tool --info`.
fn installed_opensc() -> Option<(u32, u32)> {
    let out = Command::new("opensc-tool").arg("--info").output().ok()?;
    opensc_version(&String::from_utf8_lossy(&out.stdout))
}

fn cardbridge_reading(card: &Value) -> Reading {
    let text = |v: &Value| v.as_str().map(str::to_string);
    let mut reading = Reading {
        tool: "cardbridge".into(),
        atr: text(&card["atr"]),
        card_id: text(&card["card_id"]),
        serial_number: text(&card["serial_number"]),
        ..Reading::default()
    };
    let piv = card["kind"] == "piv";
    for c in card["certificates"].as_array().into_iter().flatten() {
        let (Some(sha1), Some(sha256)) = (text(&c["thumbprint"]), text(&c["sha256"])) else {
            continue;
        };
        // Slots are PIV key references; other cards are compared by thumbprint.
        let key = if piv {
            text(&c["slot"]).unwrap_or_default()
        } else {
            sha1.clone()
        };
        reading.sha1.insert(key.clone(), sha1);
        reading.sha256.insert(key, sha256.to_uppercase());
    }
    reading
}

/// OpenSC's view: `opensc-tool` for the ATR and serial (the CHUID GUID on a PIV card, the
/// cardid file on an IDPrime card), `pkcs15-tool` for every certificate. `home` keeps OpenSC's
/// cache out of the way.
fn opensc_reading(reader: &str, kind: &str, home: &Path) -> Result<Reading> {
    let piv = kind == "piv";
    let index = reader_index(reader)?.to_string();
    let run = |tool: &str, args: &[&str]| -> Result<String> {
        let out = Command::new(tool)
            .args(["--reader", &index])
            .args(args)
            .env("HOME", home)
            .output()
            .with_context(|| format!("{tool} is not installed (apt-get install opensc)"))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let mut reading = Reading {
        tool: "OpenSC".into(),
        atr: opensc_hex(&run("opensc-tool", &["--atr"])?),
        card_id: if piv || kind == "idprime" {
            opensc_hex(&run("opensc-tool", &["--serial"])?)
        } else {
            None
        },
        ..Reading::default()
    };
    for id in opensc_certificate_ids(&run("pkcs15-tool", &["--list-certificates"])?) {
        let pem = run("pkcs15-tool", &["--read-certificate", &id])?;
        let Some(der) = pem_body(&pem) else { continue };
        let sha1 = hex::encode_upper(Sha1::digest(&der));
        let key = if piv {
            opensc_piv_slot(&id).unwrap_or(id)
        } else {
            sha1.clone()
        };
        reading
            .sha256
            .insert(key.clone(), hex::encode_upper(Sha256::digest(&der)));
        reading.sha1.insert(key, sha1);
    }
    Ok(reading)
}

fn pem_body(pem: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .ok()
        .filter(|der| !der.is_empty())
}

fn ykman_reading(ykman: &str, reader: &str) -> Result<Reading> {
    let run = |args: &[&str]| -> Result<String> {
        let out = Command::new(ykman)
            .args(["--reader", reader])
            .args(args)
            .output()
            .with_context(|| {
                format!("cannot run {ykman}: install yubikey-manager, or pass --ykman none")
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    Ok(parse_ykman(&run(&["piv", "info"])?, &run(&["info"])?))
}

/// An engine of our own, with no server: its events show what the daemon would announce.
fn watch() -> Result<(Engine, Receiver<Event>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let engine = Engine::start(
        EngineConfig {
            read: ReadOptions::default(),
            reconciler: Reconciler::new(None, CardIdOrder::default()),
            store: None,
            retry_initial: Duration::from_secs(5),
            retry_max: Duration::from_secs(5),
        },
        tx,
    )?;
    Ok((engine, rx))
}

/// Waits for `want` on `reader`; counts the `card.read` events of that reader seen meanwhile.
fn wait_for(
    events: &Receiver<Event>,
    reader: &str,
    within: Duration,
    reads: &mut usize,
    want: impl Fn(&Event) -> bool,
) -> Option<Instant> {
    let until = Instant::now() + within;
    loop {
        let event = match events.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
        };
        let here = match &event {
            Event::CardRead(c) | Event::CardReadFailed(c) => c.reader == reader,
            Event::CardInserted { reader: r, .. } | Event::CardRemoved { reader: r } => r == reader,
            _ => false,
        };
        if here && matches!(event, Event::CardRead(_)) {
            *reads += 1;
        }
        if here && want(&event) {
            return Some(Instant::now());
        }
    }
}

fn virtual_cycles(
    args: &Args,
    slot: &Slot,
    card: VirtualCard,
    inserted: Inserted,
) -> Result<Cycles> {
    let (engine, events) = watch()?;
    let reader = slot.reader.as_str();
    let mut cycles = Cycles {
        reader: reader.into(),
        cycles: args.cycles,
        ..Cycles::default()
    };
    let (mut inserts, mut removes) = (Vec::new(), Vec::new());
    let patience = Duration::from_secs(10);
    let mut ignored = 0;
    // The engine reads the card already present first.
    wait_for(&events, reader, patience, &mut ignored, |e| {
        matches!(e, Event::CardRead(_))
    });
    let mut inserted = Some(inserted);
    for n in 1..=args.cycles {
        let started = Instant::now();
        if let Some(card) = inserted.take() {
            card.remove();
        }
        match wait_for(&events, reader, patience, &mut ignored, |e| {
            matches!(e, Event::CardRemoved { .. })
        }) {
            Some(at) => removes.push(ms(at - started)),
            None => cycles
                .problems
                .push(format!("cycle {n}: the removal was not reported")),
        }
        let started = Instant::now();
        inserted = Some(insert_virtual(card.clone(), slot)?);
        let mut reads = 0;
        match wait_for(&events, reader, patience, &mut reads, |e| {
            matches!(e, Event::CardRead(_))
        }) {
            Some(at) => inserts.push(ms(at - started)),
            None => cycles
                .problems
                .push(format!("cycle {n}: the insertion was not read")),
        }
        cycles.reads_per_insertion.push(reads);
    }
    drop(inserted);
    engine.stop();
    finish(&mut cycles, &inserts, Some(&removes));
    Ok(cycles)
}

fn person_cycles(args: &Args, reader: &str) -> Result<Cycles> {
    let (engine, events) = watch()?;
    let mut cycles = Cycles {
        reader: reader.into(),
        cycles: args.cycles,
        ..Cycles::default()
    };
    let mut inserts = Vec::new();
    let patience = Duration::from_secs(args.patience);
    let mut ignored = 0;
    wait_for(
        &events,
        reader,
        Duration::from_secs(10),
        &mut ignored,
        |e| matches!(e, Event::CardRead(_)),
    );
    for n in 1..=args.cycles {
        println!("[{n}/{}] remove the card from {reader}", args.cycles);
        if wait_for(&events, reader, patience, &mut ignored, |e| {
            matches!(e, Event::CardRemoved { .. })
        })
        .is_none()
        {
            cycles
                .problems
                .push(format!("cycle {n}: no removal within {patience:?}"));
            break;
        }
        println!("[{n}/{}] insert it again", args.cycles);
        let mut reads = 0;
        let Some(detected) = wait_for(&events, reader, patience, &mut reads, |e| {
            matches!(e, Event::CardInserted { .. })
        }) else {
            cycles
                .problems
                .push(format!("cycle {n}: no insertion within {patience:?}"));
            break;
        };
        match wait_for(&events, reader, Duration::from_secs(30), &mut reads, |e| {
            matches!(e, Event::CardRead(_))
        }) {
            Some(at) => inserts.push(ms(at - detected)),
            None => cycles
                .problems
                .push(format!("cycle {n}: the insertion was not read")),
        }
        cycles.reads_per_insertion.push(reads);
    }
    engine.stop();
    finish(&mut cycles, &inserts, None);
    Ok(cycles)
}

/// Every insertion must give exactly one `card.read`.
fn finish(cycles: &mut Cycles, inserts: &[f64], removes: Option<&[f64]>) {
    cycles.insert_to_read = Timing::of(inserts);
    cycles.remove_to_removed = removes.map(Timing::of);
    for (n, reads) in cycles.reads_per_insertion.iter().enumerate() {
        if *reads != 1 {
            cycles.problems.push(format!(
                "cycle {}: {reads} card.read events for one insertion",
                n + 1
            ));
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_report(report: &Report) {
    for card in &report.cards {
        println!(
            "\n{} ({}): {} APDUs, read in {} ms",
            card.reader, card.kind, card.apdu_count, card.read_ms
        );
        println!(
            "  {:<20} {:<8} {:<8} {:<42} other",
            "check", "tool", "result", "cardbridge"
        );
        for c in &card.checks {
            let result = match c.outcome {
                Outcome::Pass => "PASS",
                Outcome::Fail => "FAIL",
                Outcome::Skipped => "skipped",
            };
            println!(
                "  {:<20} {:<8} {:<8} {:<42} {}",
                c.what,
                c.tool,
                result,
                short(&c.cardbridge),
                short(&c.other)
            );
        }
    }
    for c in &report.cycles {
        println!("\n{}: {} remove/insert cycles", c.reader, c.cycles);
        let line = |name: &str, t: &Timing| {
            println!(
                "  {name:<22} median {:>7.1} ms   p95 {:>7.1} ms   max {:>7.1} ms   ({} samples)",
                t.median_ms, t.p95_ms, t.max_ms, t.count
            )
        };
        line("insert -> card.read", &c.insert_to_read);
        if let Some(t) = &c.remove_to_removed {
            line("remove -> card.removed", t);
        }
        println!("  card.read per insertion: {:?}", c.reads_per_insertion);
        for p in &c.problems {
            println!("  FAIL {p}");
        }
    }
    let counts: BTreeMap<&str, usize> =
        report
            .cards
            .iter()
            .flat_map(|c| &c.checks)
            .fold(BTreeMap::new(), |mut m, c| {
                *m.entry(match c.outcome {
                    Outcome::Pass => "passed",
                    Outcome::Fail => "failed",
                    Outcome::Skipped => "skipped",
                })
                .or_default() += 1;
                m
            });
    println!(
        "\n{}: checks {counts:?}",
        if report.passed { "PASS" } else { "FAIL" }
    );
}

fn short(text: &str) -> String {
    if text.len() > 40 {
        format!("{}…", &text[..39])
    } else {
        text.to_string()
    }
}
