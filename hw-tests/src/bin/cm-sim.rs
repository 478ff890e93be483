//! `cm-sim`: the MIM CM / SCEPman simulator as a command, for the demo and manual testing.
//!
//! Example: `cm-sim --fixture hw-tests/fixtures/demo.json --port 8686`, then configure
//! `base_url = "http://127.0.0.1:8686/CertificateManagement/"`.

use anyhow::{Context as _, Result};
use clap::Parser;
use hw_tests::sim::{Fixture, Simulator};

#[derive(Parser)]
#[command(about = "A simulator of the MIM CM REST API and the SCEPman Management API")]
struct Args {
    /// JSON fixture: `{"smartcards": [{"smartcard": {...}, "certificates": [...], "operations": [...]}], "scepman": [...]}`.
    #[arg(long)]
    fixture: std::path::PathBuf,
    #[arg(long, default_value_t = 8686)]
    port: u16,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.fixture)
        .with_context(|| format!("cannot read {}", args.fixture.display()))?;
    let fixture: Fixture = serde_json::from_str(&text)
        .with_context(|| format!("invalid fixture {}", args.fixture.display()))?;
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
