//! Card-read benchmark: inserts the 4-certificate PIV card, an IDPrime MD 840 and an IDPrime 940
//! N times each into a vpcd reader and reads them with `cardbridge scan --json` and with
//! OpenSC's `pkcs15-tool --list-certificates`, printing the median and p95 of each and the APDUs
//! each needed (counted by the virtual card itself).
//!
//! Run it with `hw-tests/bench` (release build); it prints numbers and asserts nothing, because
//! timings on shared machines are for reading, not for failing builds.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use hw_tests::report::Recorder;
use hw_tests::rig::{
    cardbridge_bin, insert_card, insert_virtual, reader_index, wait_for_card, Rig,
};
use hw_tests::sim::{matching_record, Fixture, Simulator};
use hw_tests::vcard::{idprime, CardSpec, VirtualCard};
use hw_tests::vpcd::Inserted;

#[derive(Parser)]
#[command(about = "Benchmark cardbridge's card reads against OpenSC on the same virtual card")]
struct Args {
    /// Number of insertions.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Also append the figures to this file (`hw-tests/report`).
    #[arg(long)]
    record: Option<std::path::PathBuf>,
}

#[derive(Default)]
struct Series {
    millis: Vec<f64>,
    apdus: Vec<u64>,
}

impl Series {
    /// Prints the series; returns its timing and its median APDU count.
    fn report(&mut self, name: &str) -> (hw_tests::qualify::Timing, u64) {
        let t = hw_tests::qualify::Timing::of(&self.millis);
        self.apdus.sort_unstable();
        let apdus = self
            .apdus
            .get(self.apdus.len() / 2)
            .copied()
            .unwrap_or_default();
        println!(
            "{name:<44} median {:>7.1} ms   p95 {:>7.1} ms   APDUs/read {apdus}",
            t.median_ms, t.p95_ms,
        );
        (t, apdus)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let rig = Rig::get();
    let _shared = rig.shared();
    let slot = rig.slot();
    let bin = cardbridge_bin();
    let record = Recorder::new(args.record.clone());

    let piv = against_opensc(
        &args,
        &slot,
        "the 4-certificate PIV card (9A, 9C gzip, 9D, retired 82; extended length)",
        CardSpec::piv_four_certs(),
    )?;
    record.record(
        "APDUs per read (4-certificate PIV card)",
        piv.apdus as f64,
        "",
    )?;
    record.record(
        "APDUs of pkcs15-tool --list-certificates, same card",
        piv.opensc_apdus as f64,
        "",
    )?;
    record.record(
        "cardbridge scan ÷ pkcs15-tool --list-certificates, same card (median wall time)",
        piv.ratio,
        "×",
    )?;
    for (name, model, spec) in [
        (
            "IDPrime MD 840",
            "an IDPrime MD 840 (3 certificates, compressed)",
            idprime::Spec::md840(),
        ),
        (
            "IDPrime 940",
            "an IDPrime 940 (6 certificates, one plain; token label)",
            idprime::Spec::idp940(),
        ),
    ] {
        let r = against_opensc(&args, &slot, model, CardSpec::idprime(spec))?;
        record.record(&format!("APDUs per read ({name})"), r.apdus as f64, "")?;
        record.record(
            &format!("APDUs of pkcs15-tool --list-certificates ({name})"),
            r.opensc_apdus as f64,
            "",
        )?;
    }
    reconciliation_cost(args.runs, &slot, &bin, &record)
}

/// The medians `against_opensc` found.
struct Comparison {
    apdus: u64,
    opensc_apdus: u64,
    /// cardbridge scan ÷ pkcs15-tool, median wall time.
    ratio: f64,
}

/// Inserts the card of `spec` `--runs` times and reads it each time with `cardbridge scan` and
/// with `pkcs15-tool --list-certificates`; prints both.
fn against_opensc(
    args: &Args,
    slot: &hw_tests::rig::Slot,
    what: &str,
    spec: CardSpec,
) -> Result<Comparison> {
    let bin = cardbridge_bin();
    let home = std::env::temp_dir().join("cardbridge-bench-home");
    std::fs::create_dir_all(&home)?;
    // One card, inserted again for every run: the same bytes every time.
    let model = VirtualCard::new(spec)?;
    let mut read_ms = Series::default();
    let mut scan_wall = Series::default();
    let mut opensc_wall = Series::default();
    for _ in 0..args.runs {
        let card = insert_virtual(model.clone(), slot)?;

        let before = card.apdu_count();
        let started = Instant::now();
        let out = Command::new(&bin)
            .args(["scan", "--json", "--reader", &slot.reader])
            .output()
            .context("run cardbridge")?;
        scan_wall
            .millis
            .push(started.elapsed().as_secs_f64() * 1000.0);
        let cards: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("scan output")?;
        let reported = &cards[0];
        if !reported["error"].is_null() {
            bail!("cardbridge failed to read the card: {}", reported["error"]);
        }
        read_ms
            .millis
            .push(reported["read_ms"].as_f64().unwrap_or_default());
        let apdus = card.apdu_count() - before;
        read_ms.apdus.push(apdus);
        scan_wall.apdus.push(apdus);

        let index = reader_index(&slot.reader)?;
        let before = card.apdu_count();
        let started = Instant::now();
        let status = Command::new("pkcs15-tool")
            .args(["--reader", &index.to_string(), "--list-certificates"])
            .env("HOME", &home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("run pkcs15-tool (apt-get install opensc)")?;
        opensc_wall
            .millis
            .push(started.elapsed().as_secs_f64() * 1000.0);
        if !status.success() {
            bail!("pkcs15-tool failed: {status}");
        }
        opensc_wall.apdus.push(card.apdu_count() - before);
        card.remove();
    }
    println!("{} insertions of {what}", args.runs);
    let (_, apdus) = read_ms.report("cardbridge read (read_ms, in-process)");
    let (scan, _) = scan_wall.report("cardbridge scan --json (whole process)");
    let (opensc, opensc_apdus) =
        opensc_wall.report("pkcs15-tool --list-certificates (whole process)");
    Ok(Comparison {
        apdus,
        opensc_apdus,
        ratio: scan.median_ms / opensc.median_ms,
    })
}

/// What reconciling against the local CM simulator adds to a scan: the same card scanned with
/// and without `--reconcile`, alternately.
fn reconciliation_cost(
    runs: usize,
    slot: &hw_tests::rig::Slot,
    bin: &std::path::Path,
    recorder: &Recorder,
) -> Result<()> {
    let card = insert_card(CardSpec::piv_four_certs(), slot)?;
    let record = matching_record(&card.truth, false);
    let sim = Simulator::start(
        Fixture {
            smartcards: vec![record],
            ..Fixture::default()
        },
        0,
    )?;
    let dir = std::env::temp_dir().join("cardbridge-bench-reconcile");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\n[cm]\nbase_url = \"{}\"\n",
            dir.display(),
            sim.cm_base_url()
        ),
    )?;
    let config = config.to_string_lossy().into_owned();

    let mut plain = Series::default();
    let mut reconciled = Series::default();
    for _ in 0..runs {
        for (series, extra) in [
            (&mut plain, &[][..]),
            (&mut reconciled, &["--reconcile", "--config", &config][..]),
        ] {
            let started = Instant::now();
            let out = Command::new(bin)
                .args(["scan", "--json", "--reader", &slot.reader])
                .args(extra)
                .output()?;
            series.millis.push(started.elapsed().as_secs_f64() * 1000.0);
            let cards: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            if !extra.is_empty() && cards[0]["reconciliation"]["state"] != "matched" {
                bail!(
                    "reconciliation did not match: {}",
                    cards[0]["reconciliation"]
                );
            }
            series
                .apdus
                .push(cards[0]["apdu_count"].as_u64().unwrap_or_default());
        }
    }
    let requests = sim.log().len() / runs;
    plain.report("cardbridge scan --json");
    reconciled.report("cardbridge scan --json --reconcile (CM simulator)");
    let median = |s: &Series| s.millis[s.millis.len() / 2];
    println!(
        "scan --reconcile adds {:.1} ms (median, incl. opening the database and TLS roots), {requests} HTTP requests per card on one connection",
        median(&reconciled) - median(&plain)
    );
    card.remove();
    engine_latency(runs, slot, &sim, recorder)
}

/// In the engine (as the daemon runs it): the time from inserting a card to its `card.read`
/// and to its `card.reconciled`, over fresh insertions.
fn engine_latency(
    runs: usize,
    slot: &hw_tests::rig::Slot,
    sim: &Simulator,
    record: &Recorder,
) -> Result<()> {
    use cardbridge::engine::{Engine, EngineConfig, Event};
    use std::time::Duration;
    let config =
        cardbridge::config::Config::parse(&format!("[cm]\nbase_url = \"{}\"\n", sim.cm_base_url()))
            .map_err(anyhow::Error::msg)?;
    let client = cardbridge::cm::CmClient::new(config.cm.as_ref().context("cm section")?)?;
    let (tx, events) = std::sync::mpsc::channel();
    let _engine = Engine::start(
        EngineConfig {
            read: cardbridge::card::ReadOptions::default(),
            reconciler: cardbridge::reconcile::Reconciler::new(Some(client), Default::default()),
            store: None,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(5),
        },
        tx,
    )?;
    let mut to_read = Series::default();
    let mut to_reconciled = Series::default();
    for _ in 0..runs {
        wait_for_card(&slot.reader, false)?;
        let inserted_at = Instant::now();
        let card = Inserted::insert(
            VirtualCard::new(CardSpec::piv_four_certs())?,
            slot.port,
            false,
        )?;
        sim.replace_fixture(Fixture {
            smartcards: vec![matching_record(&card.truth, false)],
            ..Fixture::default()
        });
        let since = |at: Instant| at.duration_since(inserted_at).as_secs_f64() * 1000.0;
        let mut read = false;
        loop {
            match events.recv_timeout(Duration::from_secs(10))? {
                Event::CardRead(c) if c.reader == slot.reader => {
                    read = true;
                    to_read.millis.push(since(Instant::now()));
                    to_read.apdus.push(u64::from(c.apdu_count));
                }
                Event::CardReconciled(r) if read => {
                    if r.state != cardbridge::reconcile::State::Matched {
                        bail!("engine reconciliation did not match: {:?}", r.state);
                    }
                    to_reconciled.millis.push(since(Instant::now()));
                    break;
                }
                _ => {}
            }
        }
        card.remove();
    }
    for (series, what) in [
        (&mut to_read, "insert → card.read"),
        (
            &mut to_reconciled,
            "insert → card.reconciled (CM simulator)",
        ),
    ] {
        let (t, _) = series.report(&format!("engine: {what}"));
        record.record(&format!("{what}, median"), t.median_ms, "ms")?;
        record.record(&format!("{what}, p95"), t.p95_ms, "ms")?;
    }
    Ok(())
}
