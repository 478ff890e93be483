//! The station process: the daemon's code on scripted readers, taking the world's commands on
//! its standard input.

use std::io::BufRead;
use std::path::Path;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _, Result};
use cardbridge::card::{read_card, Card, ReadOptions, TransportError};
use cardbridge::engine::Source;
use cardbridge::pcsc::MonitorEvent;
use cardbridge::slots::{Slot, Slots};
use hw_tests::vcard::{CardSpec, Compress, Direct, Truth, VirtualCard};
use sha2::{Digest, Sha256};

use crate::{card_id, lock, reader_name, Args, TEMPLATES, TOKEN};

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

pub fn run(args: &Args, seed: u64, state: &Path) -> Result<()> {
    // As `cardbridge run` does, before the daemon's thread starts.
    cardbridge::malloc::configure();
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
