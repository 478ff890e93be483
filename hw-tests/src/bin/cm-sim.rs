//! `cm-sim`: the MIM CM / SCEPman simulator as a command, for the demo and manual testing.
//!
//! `cm-sim --fixture fixture.json` serves a fixture file; `cm-sim --from-truth piv.json` serves a
//! record that matches each virtual card exactly (from the truth files `vcard --truth` writes),
//! and SCEPman records of its certificates. Point cardbridge's `[cm]` at
//! `http://127.0.0.1:PORT/CertificateManagement/` and `[scepman]` at `http://127.0.0.1:PORT/`.

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use hw_tests::sim::{matching_record, scepman_certs, Fixture, Simulator};
use hw_tests::vcard::Truth;

#[derive(Parser)]
#[command(about = "A simulator of the MIM CM REST API and the SCEPman Management API")]
struct Args {
    /// JSON fixture: `{"smartcards": [{"smartcard": {...}, "certificates": [...], "operations": [...]}], "scepman": [...]}`.
    #[arg(long)]
    fixture: Option<std::path::PathBuf>,
    /// Truth files of virtual cards, each added as a matching, active card record.
    #[arg(long, num_args = 1..)]
    from_truth: Vec<std::path::PathBuf>,
    #[arg(long, default_value_t = 8686)]
    port: u16,
    /// A CM request completes after this many looks at it (0: stays pending).
    #[arg(long, default_value_t = 2)]
    complete_requests_after: u32,
}

fn read<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid JSON in {}", path.display()))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.fixture.is_none() && args.from_truth.is_empty() {
        bail!("give --fixture FILE or --from-truth FILE…");
    }
    let mut fixture: Fixture = match &args.fixture {
        Some(path) => read(path)?,
        None => Fixture::default(),
    };
    for path in &args.from_truth {
        let truth: Truth = read(path)?;
        fixture.smartcards.push(matching_record(&truth, false));
        fixture.scepman.extend(scepman_certs(&truth));
    }
    if args.complete_requests_after > 0 {
        fixture.complete_requests_after = args.complete_requests_after;
    }
    let sim = Simulator::start(fixture, args.port)?;
    eprintln!(
        "cm-sim: MIM CM at {}  (SCEPman at http://{}/api/manage/)",
        sim.cm_base_url(),
        sim.addr
    );
    loop {
        std::thread::park();
    }
}
