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
//! The cards: `--cards` distinct card ids over a few templates (each card's certificates are its
//! template's with the card id in their serial numbers), so the pool costs no key pair per
//! card. The state directory is on
//! `/dev/shm` when there is one: the run measures bounds, not the disk.
//!
//! `station.rs` is the station process; `world.rs` starts it and the simulator; `kiosk.rs`
//! drives the insertions and keeps the streaming checks; `checks.rs` holds the end checks.

mod checks;
mod kiosk;
mod station;
mod world;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
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
        return station::run(&args, seed, &state);
    }
    world::run(&args, seed, &state)
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
